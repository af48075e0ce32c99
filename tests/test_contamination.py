"""Contamination study (paper §5) and the unconventional problems with their LLM grader (paper §4)."""

import copy
import dataclasses
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF
from openai_server import FakeOpenAI
from phi1.contamination import measures
from phi1.eval import benchmarks
from phi1.eval.grade import grade, parse_grade
from phi1.llm import LLM, ParseError
from phi1.stages import run

RENAMED_0 = '''from typing import List


def close_pair_exists(values: List[float], limit: float) -> bool:
    """Tell whether some two of the values are nearer to each other than the limit.

    ```
    close_pair_exists([1.0, 1.5], 1.0)  # a fence of its own, as a generated exercise may hold
    ```
    """
    for a, first in enumerate(values):
        for b, second in enumerate(values):
            if a != b:
                gap = abs(first - second)
                if gap < limit:
                    return True

    return False
'''

UNRELATED = '''def parse_header(line):
    """Split an HTTP header line into its name and value."""
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()
'''


def _humaneval():
    return {p.task_id: p for p in benchmarks.humaneval()}


def test_ast_match_rate_sees_through_renaming_and_not_through_unrelated_code():
    he = _humaneval()["HumanEval/0"]
    original = measures.ast_labels(he.prompt + he.canonical_solution)
    assert measures.match_rate(original, measures.ast_labels(RENAMED_0)) == 1.0  # names, docstring differ
    edited = RENAMED_0.replace("                    return True", "                    print(gap)\n"
                                                                   "                    return True")
    assert 0.85 < measures.match_rate(original, measures.ast_labels(edited)) < 1.0
    assert measures.match_rate(original, measures.ast_labels(UNRELATED)) < 0.4
    assert measures.ast_labels("def f(:\n") is None


def test_docstring_13_grams():
    he = _humaneval()["HumanEval/0"]
    words = measures.docstring_words(he.prompt)
    assert len(words) > 13
    copied = f'def g(x):\n    """{" ".join(words[:14])} and more"""\n    return x\n'
    shared = measures.ngrams(measures.docstring_words(copied), 13) & measures.ngrams(words, 13)
    assert len(shared) == 2  # 14 copied words hold two 13-grams
    assert not measures.ngrams(measures.docstring_words(UNRELATED), 13) & measures.ngrams(words, 13)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An exercise set: 300 stdlib functions plus planted copies of HumanEval problems."""
    from omegaconf import OmegaConf

    from phi1.config import SourceConfig
    from phi1.data.sources import documents

    tmp = tmp_path_factory.mktemp("decontaminate")
    he = _humaneval()
    rows = [{"id": doc_id.split(":", 1)[1], "text": text} for doc_id, text in documents(
        OmegaConf.structured(SourceConfig(name="s", kind="stdlib_functions", limit=300, on_error="skip")))]
    words = measures.docstring_words(he["HumanEval/4"].prompt)
    rows += [
        {"id": "copy-0", "text": he["HumanEval/0"].prompt + he["HumanEval/0"].canonical_solution},  # verbatim
        {"id": "renamed-0", "text": RENAMED_0},  # same code, other names and docstring
        {"id": "doc-4", "text": f'def spread(xs):\n    """{" ".join(words)}"""\n    return max(xs) - min(xs)\n'},
    ]
    path = tmp / "exercises.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=[
            f"paths.data_dir={tmp}", "stage=decontaminate", "stage.train.name=exercises", "stage.train.kind=jsonl",
            f"stage.train.path={path}", "stage.workers=2", "stage.embed.batch_size=32"])
    summary = run(cfg)
    out = tmp / "decontaminate" / "humaneval-exercises"
    neighbours = {r["task_id"]: r for r in map(json.loads, open(out / "neighbours.jsonl"))}
    return summary, neighbours, out, len(rows), cfg


def test_planted_copies_are_found_by_each_measure(planted):
    summary, neighbours, out, n, _ = planted
    assert summary["train_items"] == n and summary["problems"] == 164
    zero = neighbours["HumanEval/0"]
    assert {a["id"] for a in zero["ast"] if a["tau"] == 1.0} == {"exercises:copy-0", "exercises:renamed-0"}
    assert zero["embedding"][0]["id"] == "exercises:copy-0" and zero["embedding"][0]["l2"] < 0.01
    assert zero["ngram13"][0]["id"] == "exercises:copy-0"  # the verbatim docstring; the renamed one has another
    assert "exercises:renamed-0" not in {m["id"] for m in zero["ngram13"]}
    assert neighbours["HumanEval/4"]["ngram13"][0]["id"] == "exercises:doc-4"
    # unrelated stdlib code is no near-copy of any problem
    planted_ids = {"exercises:copy-0", "exercises:renamed-0"}
    others = [a for r in neighbours.values() for a in r["ast"] if a["id"] not in planted_ids]
    assert all(a["tau"] < 0.95 for a in others)
    assert "HumanEval/0" in (out / "similar-tau0.95.txt").read_text().split()
    report = (out / "report.md").read_text()
    assert report.count("τ = 1.000") >= 1
    assert "````python\nfrom typing import List\n\n\ndef close_pair_exists(" in report  # shown inside a longer fence


def test_pruning_counts_and_subsets(planted):
    summary, neighbours, out, n, _ = planted
    previous = 0
    for tau in ("0.95", "0.90", "0.85", "0.80"):
        stats = summary["per_tau"][tau]
        pruned = (out / f"pruned-tau{tau}.jsonl").read_text().splitlines()
        assert len(pruned) == stats["kept"] == n - stats["removed"]
        assert stats["removed"] >= max(previous, 2)  # lower τ removes at least as much; both copies of /0 go
        previous = stats["removed"]
        similar = (out / f"similar-tau{tau}.txt").read_text().split()
        nonsimilar = (out / f"nonsimilar-tau{tau}.txt").read_text().split()
        assert len(similar) + len(nonsimilar) == 164 and not set(similar) & set(nonsimilar)
    ids = {json.loads(line)["id"] for line in open(out / "pruned-tau0.95.jsonl")}
    assert "exercises:copy-0" not in ids and "exercises:renamed-0" not in ids
    # evaluate.py scores a subset through benchmark.task_ids
    from omegaconf import OmegaConf

    spec = OmegaConf.create({"name": "humaneval", "kind": "humaneval", "task_ids": str(out / "similar-tau0.95.txt")})
    assert [p.task_id for p in benchmarks.load(spec)] == (out / "similar-tau0.95.txt").read_text().split()
    table = (out / "table3.md").read_text()
    assert "81.7 / 74.6 / 57.7" in table and "59.5 / 52.6 / 45.7" in table  # paper: similar at 0.95, 0.80
    assert "(71)" in table and "(42,500)" in table  # the paper's numbers beside ours


def test_another_benchmark_gets_its_table_without_humanevals_numbers(tmp_path):
    """Table 3's numbers are HumanEval's: an MBPP or own-problems study was headed "HumanEval pass@1" and showed
    HumanEval's 71 similar problems at τ 0.95 as the count to compare its own with."""
    he = _humaneval()
    problems = tmp_path / "mine.jsonl"
    problems.write_text("".join(json.dumps({"task_id": f"Mine/{i}", "prompt": p.prompt, "test": p.test,
                                            "canonical_solution": p.canonical_solution, "entry_point": p.entry_point})
                                + "\n" for i, p in enumerate(he[f"HumanEval/{i}"] for i in range(3))))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in (("r", RENAMED_0), ("u", UNRELATED))))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=[
            f"paths.data_dir={tmp_path}", "stage=decontaminate", "stage.benchmark.name=mine",
            "stage.benchmark.kind=jsonl", f"+stage.benchmark.path={problems}", "stage.train.name=ex",
            "stage.train.kind=jsonl", f"stage.train.path={train}", "stage.workers=1", "stage.embed.enabled=false"])
    summary = run(cfg)
    assert summary["per_tau"]["0.95"]["similar"] == 1  # Mine/0, renamed
    table = (tmp_path / "decontaminate" / "mine-ex" / "table3.md").read_text()
    assert table.startswith("# Contamination: mine pass@1") and "no numbers of its" in table
    assert "| 0.95 | similar | 1 (–) |" in table and "81.7" not in table and "(71)" not in table


def test_similarity_figure_counts_what_the_pruning_removes(planted):
    """similarity.png draws, τ by τ, the similar problems and the share of items pruned: at each configured τ
    its curves say what similar-tau*.txt and the pruned sets hold."""
    from phi1.contamination.decontaminate import similarity_curves

    summary, neighbours, out, n, _ = planted
    problem_best = [max((a["tau"] for a in r["ast"]), default=0.0) for r in neighbours.values()]
    item_best = json.loads((out / "scores.json").read_text())["best"]  # each item's best τ, as the stage scored
    curves = similarity_curves(problem_best, item_best)
    for tau in ("0.95", "0.90", "0.85", "0.80"):
        at = curves["tau"].index(float(tau))
        assert curves["similar"][at] == summary["per_tau"][tau]["similar"] == \
            len((out / f"similar-tau{tau}.txt").read_text().split())
        assert curves["removed_share"][at] == pytest.approx(100 * summary["per_tau"][tau]["removed"] / n)
    assert curves["similar"][-1] == 1 and curves["removed_share"][-1] == pytest.approx(100 * 2 / n)
    assert curves["similar"] == sorted(curves["similar"], reverse=True)  # a lower τ finds at least as many
    assert (out / "similarity.png").stat().st_size > 20_000


def test_a_rerun_reuses_the_scores_unless_what_they_depend_on_changed(planted, monkeypatch):
    from phi1.contamination import decontaminate

    summary, _, out, _, cfg = planted
    files = ["neighbours.jsonl", "table3.md", "pruned-tau0.90.jsonl", "similar-tau0.90.txt", "report.md"]
    before = {f: (out / f).read_bytes() for f in files}
    real = decontaminate._score
    monkeypatch.setattr(decontaminate, "_score", lambda *a: pytest.fail("scored again"))
    again = run(cfg)  # e.g. to add an evaluation run to Table 3: seconds, not the scoring pass
    assert again == summary and {f: (out / f).read_bytes() for f in files} == before
    calls = []
    monkeypatch.setattr(decontaminate, "_score", lambda *a: calls.append(1) or real(*a))
    other = copy.deepcopy(cfg)
    other.stage.ngram = 10  # a measure's setting: scored again, and saved for the next run
    run(other)
    run(other)
    assert len(calls) == 1


def test_the_embedding_measure_runs_on_a_gpu_where_one_is_visible_unless_told(monkeypatch):
    """stage.embed.device was "cpu" by default: the paper's CodeGen-350M over 879.5K exercises ran on the CPU of
    a GPU machine, where stage=embed picks CUDA itself."""
    import torch

    from phi1.contamination import decontaminate
    from phi1.quality import embed

    chosen = []

    def load_encoder(name, device, max_tokens, key):
        chosen.append(device)
        raise RuntimeError("enough")

    monkeypatch.setattr(embed, "load_encoder", load_encoder)
    cfg = OmegaConf.create({"model": "m", "device": None, "max_tokens": 16, "batch_size": 2})
    for visible, device, expected in ((True, None, "cuda"), (False, None, "cpu"), (True, "cpu", "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
        cfg.device = device
        with pytest.raises(RuntimeError, match="enough"):
            decontaminate._Embedder(cfg, [])
        assert chosen.pop() == expected


def test_a_scoring_stopped_midway_leaves_no_embeddings_behind(tmp_path, monkeypatch):
    """The training items' embeddings lie in a temporary folder (1.8 GB for CodeExercises with the paper's
    CodeGen-350M), which a scoring stopped by an error (a malformed line an hour in) or Ctrl-C left behind."""
    import tempfile

    import numpy as np

    from phi1.data.sources import SourceError
    from phi1.quality import embed

    monkeypatch.setattr(embed, "load_encoder", lambda *a: (None, None))
    monkeypatch.setattr(embed, "embed_texts", lambda model, tok, texts, n, batch: np.ones((len(texts), 8), np.float32))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    train = tmp_path / "exercises.jsonl"
    rows = [json.dumps({"id": f"e{i}", "text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(4500)]
    # Past the first read (two chunks of 2000 with one worker): those are scored and embedded before it.
    train.write_text("\n".join([*rows, "{not json"]) + "\n")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=[
            f"paths.data_dir={tmp_path}", "stage=decontaminate", "stage.train.name=exercises", "stage.train.kind=jsonl",
            f"stage.train.path={train}", "stage.train.on_error=stop", "stage.workers=1"])
    with pytest.raises(SourceError, match=rf"{train}:4501"):
        run(cfg)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_50_unconventional_problems_pass_with_their_solutions_and_fail_without():
    from phi1.eval.sandbox import Sandbox

    problems = benchmarks.load(__import__("omegaconf").OmegaConf.create({"name": "u", "kind": "unconventional"}))
    assert len(problems) == 50 and len({p.entry_point for p in problems}) == 50
    human = {p.prompt for p in benchmarks.humaneval()}
    assert not any(p.prompt in human for p in problems)
    with Sandbox(workers=2) as sandbox:
        right = sandbox.run_many([p.program(p.canonical_solution) for p in problems])
        wrong = sandbox.run_many([p.program("    return None\n") for p in problems])
    assert [v["status"] for v in right] == ["passed"] * 50, [p.task_id for p, v in zip(problems, right)
                                                             if v["status"] != "passed"]
    assert all(v["status"] == "failed" for v in wrong)


@pytest.mark.parametrize("answer,grade_", [
    ("Correct and clear.\nGrade: 9/10", 9),
    ("It misses the edge case. **Grade:** 6 / 10", 6),
    ("Grade: 3/10 at first glance; looking again\nGrade: 5 out of 10", 5),
])
def test_grades_are_parsed_robustly(answer, grade_):
    assert parse_grade(answer)["grade"] == grade_


@pytest.mark.parametrize("answer", ["", "Looks fine to me.", "Grade: 12/10", "Score: 7/10"])
def test_ungradable_answers_are_refused(answer):
    with pytest.raises(ParseError):
        parse_grade(answer)


def test_llm_grader_against_the_loopback_server_reports_ungradable_answers(tmp_path):
    problems = benchmarks.load(__import__("omegaconf").OmegaConf.create({"name": "u", "kind": "unconventional"}))[:6]

    def reply(messages):
        content = messages[-1]["content"]
        if "shout_every_third" in content:
            return "I would rather not say."  # ungradable
        return "The solution follows the rules and handles the empty case.\nGrade: 8/10"

    completions = {p.task_id: [p.canonical_solution] for p in problems}
    with FakeOpenAI(reply=reply) as server:
        llm = LLM(model="grader", base_url=server.base_url, cache_path=str(tmp_path / "cache.sqlite"),
                  quarantine_path=str(tmp_path / "quarantine.jsonl"))
        result = grade(llm, problems, completions)
        prompt = server.requests[0]["body"]["messages"][0]["content"]
    assert result["graded"] == 5 and result["mean"] == 8.0
    assert result["ungradable"] == ["Unconventional/0"]
    assert "Grade: N/10" in prompt and "verbal evaluation" in prompt
    assert json.loads((tmp_path / "quarantine.jsonl").read_text().splitlines()[0])["id"] == "Unconventional/0"
    # A problem whose own text holds a template field is shown as written, the completion once, in its place.
    odd = dataclasses.replace(problems[1], prompt='def show(solution):\n    """Print f"{solution}"."""\n')
    with FakeOpenAI(reply=reply) as server:
        llm = LLM(model="grader", base_url=server.base_url, cache_path=str(tmp_path / "cache.sqlite"),
                  quarantine_path=str(tmp_path / "quarantine.jsonl"))
        grade(llm, [odd], {odd.task_id: ["    print(solution)\n"]})
        prompt = server.requests[0]["body"]["messages"][0]["content"]
    assert '"""Print f"{solution}"."""' in prompt and prompt.count("print(solution)") == 1


def test_evaluate_scores_and_grades_the_unconventional_benchmark(tmp_path):
    """evaluate.py benchmark=unconventional samples=... llm=<server>: pass@1 by execution and the LLM grade."""
    from omegaconf import OmegaConf

    from phi1.evaluate import evaluate

    problems = benchmarks.load(OmegaConf.create({"name": "u", "kind": "unconventional"}))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p.task_id, "completion": p.canonical_solution if i % 2 else
                                           "    return None\n"}) + "\n" for i, p in enumerate(problems)))
    with FakeOpenAI(reply=lambda m: "Right idea.\nGrade: 7/10" if "return None" not in m[-1]["content"]
                    else "It returns nothing.\nGrade: 0/10") as server:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("evaluate", overrides=[
                f"paths.run_dir={tmp_path}/run", f"paths.data_dir={tmp_path}", "wandb_mode=disabled",
                "allow_code_execution=true", "benchmark=unconventional", f"samples={samples}",
                "llm=openai_compatible", f"llm.base_url={server.base_url}", "llm.model=grader"])
        metrics = evaluate(cfg)
    assert metrics["eval/unconventional/pass@1"] == 0.5
    assert metrics["eval/unconventional/score"] == 3.5 and metrics["eval/unconventional/graded"] == 50
    grades = [json.loads(line) for line in open(tmp_path / "run" / "unconventional" / "grades.jsonl")]
    assert len(grades) == 50 and {g["grade"] for g in grades} == {0, 7}


def test_grading_without_the_graders_key_stops_before_the_model_generates(tmp_path, monkeypatch):
    """llm=gpt4 grades after generation and execution (minutes for phi-1 on a GPU): a missing key used to be
    found only then, with the completions unscored."""
    from phi1.eval import generate
    from phi1.evaluate import evaluate
    from phi1.llm import AuthError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("the model was loaded before the key check"))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"paths.run_dir={tmp_path}/run", f"paths.data_dir={tmp_path}", "wandb_mode=disabled",
            "allow_code_execution=true", "benchmark=unconventional", f"ckpt={tmp_path}", "llm=gpt4"])
    with pytest.raises(AuthError, match="no API key: set OPENAI_API_KEY"):
        evaluate(cfg)
    assert not (tmp_path / "run").exists()


def test_table3_samples_are_checked_before_the_scoring_and_counted_per_subset(planted, monkeypatch, tmp_path):
    """stage.samples: a missing file, another benchmark's samples or a malformed line used to surface after the
    scoring pass (hours for CodeExercises), or not at all (another benchmark's tasks: every cell 0)."""
    from phi1.contamination import decontaminate
    from phi1.errors import InputError

    summary, _, out, _, cfg = planted
    samples = tmp_path / "samples.jsonl"
    other = copy.deepcopy(cfg)
    other.stage.samples = {"mine": str(samples)}
    real = decontaminate._scores
    monkeypatch.setattr(decontaminate, "_scores", lambda *a: pytest.fail("scored before the samples were read"))
    with pytest.raises(FileNotFoundError, match=rf"stage.samples.mine={samples}: no such file"):
        run(other)
    samples.write_text('{"task_id": "HumanEval/0", "passed": true}\n{"task_id": 11, "passed": false}\n')
    with pytest.raises(InputError, match=r"samples.jsonl:2: task_id 11 is not a problem of the benchmark compared"):
        run(other)
    samples.write_text('{"task_id": "HumanEval/0", "passed": true}\n{"task_id": "HumanEval/1"}\n')
    with pytest.raises(InputError, match=r"samples.jsonl:2: expected a JSON object with task_id and passed"):
        run(other)
    # HumanEval/0 passes (similar at 0.95: its planted copies), the rest fail: 1 of the similar problems.
    samples.write_text("".join(json.dumps({"task_id": f"HumanEval/{i}", "passed": i == 0}) + "\n" for i in range(164)))
    monkeypatch.setattr(decontaminate, "_scores", real)
    table = run(other)["table3"]["0.95"]
    assert table["similar"]["mine"] == round(100 / table["similar"]["count"], 1)
    assert table["nonsimilar"]["mine"] == 0.0


def test_a_grader_that_fails_loses_none_of_the_scores(tmp_path):
    """Grading comes after generation and execution; a grader out of quota stopped the run before metrics.json."""
    from omegaconf import OmegaConf

    from phi1.evaluate import evaluate
    from phi1.llm import QuotaExceeded

    problems = benchmarks.load(OmegaConf.create({"name": "u", "kind": "unconventional"}))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p.task_id, "completion": p.canonical_solution + (
        "    # [quota]\n" if i == 3 else "")}) + "\n" for i, p in enumerate(problems)))
    with FakeOpenAI(reply=lambda m: "Fine.\nGrade: 9/10") as server:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("evaluate", overrides=[
                f"paths.run_dir={tmp_path}/run", f"paths.data_dir={tmp_path}", "wandb_mode=disabled",
                "allow_code_execution=true", "benchmark=unconventional", f"samples={samples}",
                "llm=openai_compatible", f"llm.base_url={server.base_url}", "llm.model=grader"])
        with pytest.raises(QuotaExceeded):
            evaluate(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval/unconventional/pass@1"] == 1.0 and "eval/unconventional/score" not in metrics
