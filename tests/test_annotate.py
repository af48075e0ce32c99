"""The annotate stage (paper §2.1): heuristic rules, the LLM judge against a loopback server, resume."""

import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF
from openai_server import FakeOpenAI
from phi1.llm import ParseError
from phi1.quality.judges import HeuristicJudge, parse_grade
from phi1.stages import run

ALGORITHM = '''
def binary_search(items, target):
    """Return the index of target in the sorted list items, or -1.

    Halves the search interval at each step: O(log n) comparisons.
    """
    lo, hi = 0, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2  # middle of the interval
        if items[mid] == target:
            return mid
        if items[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1
'''

CONFIGURATION = "\n".join(f"SETTING_{i} = {i}" for i in range(30)) + "\nfrom .base import *\n"


def prepare_cfg(tmp_path, *overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("prepare", overrides=[f"paths.data_dir={tmp_path}", f"paths.run_dir={tmp_path}/run",
                                             *overrides])


def test_heuristic_rules_prefer_a_documented_algorithm_to_configuration():
    judge = HeuristicJudge()
    good, config, broken = judge.judge(ALGORITHM), judge.judge(CONFIGURATION), judge.judge("def f(:\n")
    assert good.score >= 8 and config.score <= 2 and broken.score == 0
    assert "relative" in config.rationale and broken.rationale == "does not parse"


@pytest.mark.parametrize("answer,score", [
    ("Clear code.\nEducational value: 8/10", 8),
    ("Nice. **Educational value:** 7 / 10", 7),
    ("educational value = 3/10 at first... on reflection\nEducational value: 5/10", 5),
])
def test_grades_are_parsed_robustly(answer, score):
    assert parse_grade(answer).score == score


@pytest.mark.parametrize("answer", ["", "I would rate it highly.", "Educational value: 11/10", "Value: 7/10"])
def test_ungradable_answers_are_refused_not_guessed(answer):
    with pytest.raises(ParseError):
        parse_grade(answer)


def test_heuristic_annotation_of_the_stdlib_is_seeded_and_resumable(tmp_path):
    cfg = prepare_cfg(tmp_path, "stage.n=40", "stage.seed=3")
    summary = run(cfg)
    out = tmp_path / "annotations" / "stdlib-heuristic.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 == summary["annotated"]
    assert set(rows[0]) == {"id", "label", "score", "rationale", "judge", "prompt_version"}
    assert all(r["label"] == ("high" if r["score"] >= 6 else "low") for r in rows)
    assert summary["labels"].get("high", 0) > 0 and summary["labels"].get("low", 0) > 0
    # The judgement read against the code: per score, high to low, its first two documents and their rationale.
    md = (tmp_path / "annotations" / "stdlib-heuristic.examples.md").read_text()
    scores = sorted({r["score"] for r in rows}, reverse=True)
    headings = [line for line in md.splitlines() if line.startswith("## Score ")]
    assert headings == [f"## Score {s} ({sum(r['score'] == s for r in rows)} documents)" for s in scores]
    shown = [r for s in scores for r in [r for r in rows if r["score"] == s][:2]]
    assert [line[4:] for line in md.splitlines() if line.startswith("### stdlib:")] == [  # (code has ### lines)
        f"{r['id']}: {r['label']}" for r in shown]
    assert all(f"> {' '.join(r['rationale'].split())}" in md for r in shown)
    again = run(cfg)  # same seed: same sample, already annotated: nothing new
    assert again["new"] == 0 and len(out.read_text().splitlines()) == 40
    other = run(prepare_cfg(tmp_path / "b", "stage.n=40", "stage.seed=4"))
    other_ids = {json.loads(line)["id"] for line in open(other["output"])}
    assert other_ids != {r["id"] for r in rows}


def test_the_sample_is_drawn_in_one_pass_and_kept_for_the_paid_run_and_its_resumes(tmp_path, monkeypatch):
    """Sampling reads the whole source (The Stack from the hub: hours): the dry run's sample serves the runs after
    it without another pass; a source that changed, another n or another seed is sampled again."""
    import phi1.data.sources

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": ALGORITHM.replace("target", f"t{i}")}) + "\n"
                           for i in range(50)))
    args = [f"stage.source={{name: docs, kind: jsonl, path: '{src}'}}", "stage.n=10"]
    first = run(prepare_cfg(tmp_path, *args))
    out = tmp_path / "annotations" / "docs-heuristic.jsonl"
    cache = tmp_path / "annotations" / "docs-heuristic.sample.jsonl"
    head = json.loads(cache.read_text().splitlines()[0])
    assert (head["sampled"], head["read"], head["n"], head["seed"]) == (10, 50, 10, 0)
    real = phi1.data.sources.documents
    monkeypatch.setattr(phi1.data.sources, "documents", lambda *a, **k: pytest.fail("the source was read again"))
    assert run(prepare_cfg(tmp_path, *args))["new"] == 0 and out.read_text().count("\n") == first["annotated"]
    monkeypatch.setattr(phi1.data.sources, "documents", real)
    with open(src, "a") as f:  # the source changed: its fingerprint (sizes, mtimes) with it
        f.write(json.dumps({"id": "d50", "text": CONFIGURATION}) + "\n")
    run(prepare_cfg(tmp_path, *args))
    assert json.loads(cache.read_text().splitlines()[0])["read"] == 51
    fresh = run(prepare_cfg(tmp_path / "fresh", *args))  # the same draw as sampling anew
    assert cache.read_text() == (tmp_path / "fresh" / "annotations" / "docs-heuristic.sample.jsonl").read_text()
    assert fresh["sampled"] == 10


def test_each_document_gets_its_own_judgement_and_two_of_one_id_are_refused(tmp_path):
    """Files of one name in two folders (`*/part.jsonl`) named their first rows alike (`part.jsonl:1`), and the
    documented algorithm was written down with the configuration file's score. An id field that two texts share
    is refused, naming it, before anything is judged; one text under one id (a content hash) is one document."""
    from phi1.data.sources import SourceError

    for folder, text in (("a", ALGORITHM), ("b", CONFIGURATION)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "part.jsonl").write_text(json.dumps({"text": text, "repo": "one/repo"}) + "\n")
    source = f"stage.source={{name: parts, kind: jsonl, path: '{tmp_path}/*/part.jsonl'}}"
    run(prepare_cfg(tmp_path, source, "stage.n=10"))
    rows = [json.loads(line) for line in (tmp_path / "annotations" / "parts-heuristic.jsonl").read_text().splitlines()]
    assert [(r["id"], r["label"]) for r in rows] == [("parts:a/part.jsonl:1", "high"), ("parts:b/part.jsonl:1", "low")]
    shared = f"stage.source={{name: repos, kind: jsonl, path: '{tmp_path}/*/part.jsonl', id_field: repo}}"
    with pytest.raises(SourceError, match="source 'repos': the id 'repos:one/repo' names documents of different "
                                          "texts; .* id_field"):
        run(prepare_cfg(tmp_path, shared, "stage.n=10"))
    assert not (tmp_path / "annotations" / "repos-heuristic.jsonl").exists()
    (tmp_path / "b" / "part.jsonl").write_text((tmp_path / "a" / "part.jsonl").read_text())  # an exact copy
    assert run(prepare_cfg(tmp_path, shared, "stage.n=10"))["labels"] == {"high": 2}


def test_a_rerun_relabels_at_its_threshold_and_refuses_another_judges_rows(tmp_path):
    """A label is a function of the score: a rerun at another stage.label_threshold relabels the whole file
    (it kept the old labels and added rows under the new threshold: two thresholds in one file). Rows judged by
    another judge or prompt are refused with the file untouched; a line a kill cut short is judged again; a
    malformed line is named."""
    from phi1.config import ConfigError
    from phi1.errors import InputError

    out = tmp_path / "annotations" / "stdlib-heuristic.jsonl"
    first = run(prepare_cfg(tmp_path, "stage.n=40", "stage.seed=3"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["label"] for r in rows} == {"high", "low"}
    more = run(prepare_cfg(tmp_path, "stage.n=60", "stage.seed=3", "stage.label_threshold=8"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert more["annotated"] == len(rows) and more["new"] == len(rows) - 40
    assert any(r["score"] in (6, 7) for r in rows[:40])  # rows of the first run that were high at 6
    assert all(r["label"] == ("high" if r["score"] >= 8 else "low") for r in rows)
    assert sum(r["label"] == "high" for r in rows) == more["labels"].get("high", 0) < first["labels"]["high"]

    with pytest.raises(ConfigError, match=r"stage.label_threshold: must be in \(0, 10\]"):
        run(prepare_cfg(tmp_path, "stage.label_threshold=11"))

    whole = out.read_text()
    lines = whole.splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # the last row cut short
    again = run(prepare_cfg(tmp_path, "stage.n=60", "stage.seed=3", "stage.label_threshold=8"))
    assert again["new"] == 1 and out.read_text() == whole

    other = json.loads(lines[0]) | {"judge": "gpt-4-0613", "prompt_version": "v1"}
    out.write_text(json.dumps(other) + "\n" + "\n".join(lines[1:]) + "\n")
    kept = out.read_text()
    with pytest.raises(InputError, match=rf"{out}: rows judged 1 by gpt-4-0613 with prompt v1; this run's "
                                         "judge is heuristic with prompt rules-v1"):
        run(prepare_cfg(tmp_path, "stage.n=60", "stage.seed=3"))
    assert out.read_text() == kept
    out.write_text(lines[0] + "\n{not json\n" + "\n".join(lines[2:]) + "\n")
    with pytest.raises(InputError, match=rf"{out}:2: not a JSON row"):
        run(prepare_cfg(tmp_path, "stage.n=60", "stage.seed=3"))


def test_llm_judge_asks_the_papers_question_and_pays_once(tmp_path, monkeypatch):
    from phi1.errors import InputError

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def reply(messages):
        code = messages[-1]["content"]
        return "Self-contained and documented.\nEducational value: 8/10" if "def " in code else "[malformed]"

    src = tmp_path / "code.jsonl"
    docs = [{"id": f"good{i}", "text": ALGORITHM.replace("binary_search", f"search{i}")} for i in range(6)]
    docs += [{"id": "odd", "text": "x = 1"}]
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    with FakeOpenAI(reply) as server:
        cfg = prepare_cfg(tmp_path, "llm=gpt4", f"llm.base_url={server.base_url}", "stage.n=7",
                          f"stage.source={{name: code, kind: jsonl, path: '{src}'}}", "llm.max_retries=1")
        estimate = run(prepare_cfg(tmp_path, "llm=gpt4", f"llm.base_url={server.base_url}", "stage.n=7",
                                   f"stage.source={{name: code, kind: jsonl, path: '{src}'}}", "stage.dry_run=true"))
        assert server.count() == 0 and estimate["dry_run"]["requests"] == 7 and estimate["dry_run"]["dollars"] > 0
        summary = run(cfg)
        # Requests go out concurrently, so the server sees them in any order: look at all of them.
        prompts = [r["body"]["messages"][-1]["content"] for r in server.requests]
        assert all("educational value for a student whose goal is to learn basic coding concepts" in p
                   for p in prompts)
        assert sorted(p.count("def search") for p in prompts) == [0] + [1] * 6
        assert {r["body"]["model"] for r in server.requests} == {"gpt-4-0613"}
        assert summary["annotated"] == 6 and summary["labels"] == {"high": 6}  # 8 >= 6
        quarantine = [json.loads(line) for line in (tmp_path / "annotations" / "quarantine.jsonl").open()]
        assert [q["id"] for q in quarantine] == ["code:odd"] and "unparseable" in quarantine[0]["reason"]
        sent = server.count()
        assert run(cfg)["new"] == 0 and server.count() == sent  # rerun: the cache answers, nothing is paid
    row = json.loads((tmp_path / "annotations" / "code-gpt4.jsonl").read_text().splitlines()[0])
    assert row["judge"] == "gpt-4-0613" and row["prompt_version"] == "v1" and row["score"] == 8
    assert row["max_chars"] == 12000
    # A rerun that shows the judge another cut of each document would add rows judged on other text.
    out = tmp_path / "annotations" / "code-gpt4.jsonl"
    kept = out.read_text()
    with pytest.raises(InputError, match=r"rows judged 6 by gpt-4-0613 with prompt v1 shown 12,000 characters; "
                                         r"this run's judge is gpt-4-0613 with prompt v1 shown 400 characters"):
        run(prepare_cfg(tmp_path, "llm=gpt4", "llm.base_url=http://127.0.0.1:9/v1", "stage.n=7",
                        f"stage.source={{name: code, kind: jsonl, path: '{src}'}}", "stage.max_chars=400"))
    assert out.read_text() == kept
