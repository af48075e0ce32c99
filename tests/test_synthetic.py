"""Synthetic textbooks and exercises (paper §2.2) against the loopback OpenAI-compatible server: constraints
as drawn, gates and dedup on planted bad answers, doctest execution, resume after a kill, budget, dry run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, ROOT
from openai_server import FakeOpenAI
from phi1.eval.benchmarks import read_jsonl
from phi1.llm import BatchPending, BudgetExceeded
from phi1.stages import run
from phi1.synthetic import exercises, textbooks
from phi1.synthetic.generate import load_list


def prepare_cfg(tmp_path, server, *overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("prepare", overrides=[
            f"paths.data_dir={tmp_path}", f"paths.run_dir={tmp_path}/run", "llm=openai_compatible",
            f"llm.base_url={server.base_url}", "llm.model=test-model", "llm.concurrency=4", *overrides])


def passage(topic: str, n: int = 0) -> str:
    """A well-formed textbook passage about `topic`, distinct per (topic, n): its notes are seeded word salad,
    so that no two passages are near-duplicates by accident."""
    import random

    rng = random.Random(f"{topic}:{n}")
    vocabulary = load_list("concepts", "v1") + load_list("verbs", "v1")
    notes = " ".join(rng.choice(vocabulary) for _ in range(160))
    return (f"## {topic.capitalize()}\n\nIn this section we study {topic}.\n\n"
            f"```python\ndef demo_{n}(values):\n    total = {n}\n    for value in values:\n"
            f"        total += value\n    return total\n```\n\nNotes: {notes}.\n")


def test_constraints_are_drawn_from_the_shipped_lists_seeded_and_stable():
    from omegaconf import OmegaConf

    from phi1.config import TextbooksConfig

    stage = OmegaConf.structured(TextbooksConfig(n=400, output="x"))
    topics = load_list("topics", "v1")
    assert len(topics) >= 200
    drawn = textbooks.items(stage)
    assert drawn == textbooks.items(stage)  # seeded
    assert [c for _, c, _ in drawn] != [c for _, c, _ in textbooks.items(OmegaConf.merge(stage, {"seed": 1}))]
    assert textbooks.items(OmegaConf.merge(stage, {"n": 50})) == drawn[:50]  # raising n extends the set
    assert len({c["topic"] for _, c, _ in drawn}) > 150  # 400 draws over 216 topics
    assert len({c["audience"] for _, c, _ in drawn}) == len(load_list("audiences", "v1"))
    for _, c, messages in drawn[:20]:
        prompt = messages[0]["content"]
        assert c["topic"] in prompt and c["audience"] in prompt and c["style"] in prompt
        assert len(set(c["concepts"])) == 3 and all(w in prompt for w in c["concepts"])


def test_no_two_documents_ask_the_same_question():
    """A repeated prompt is answered from the LLM cache with the same text and dropped as an exact duplicate: drawn
    independently, 88 of 10K exercise prompts repeated an earlier one (44% of the paper's 880K). A repeat is drawn
    again; a document whose first draw was new keeps it (the cache of an earlier run still answers it)."""
    from omegaconf import OmegaConf

    from phi1.config import ExercisesConfig
    from phi1.synthetic.generate import distinct, rng_for

    stage = OmegaConf.structured(ExercisesConfig(n=10_000, output="x"))
    drawn = exercises.items(stage)
    prompts = [m[0]["content"] for _, _, m in drawn]
    assert len(set(prompts)) == len(prompts)
    assert exercises.items(OmegaConf.merge(stage, {"n": 3000})) == drawn[:3000]  # raising n extends the set
    lists = {name: load_list(name, "v1") for name in ("topics", "verbs", "concepts")}
    seen, redrawn = set(), 0
    for i, prompt in enumerate(prompts):
        rng = rng_for(0, i)
        first = {"topic": rng.choice(lists["topics"]), "verb": rng.choice(lists["verbs"]),
                 "concept": rng.choice(lists["concepts"])}
        first_prompt = exercises.load_prompt("exercise", "v1").format(**first)
        assert (prompt == first_prompt) == (first_prompt not in seen), i
        redrawn += prompt != first_prompt
        seen.add(prompt)
    assert redrawn == 90, redrawn  # the 88 repeats, and 2 first draws that a redrawn document took before them

    # Combinations used up: the repeats are asked as numbered variants, still no two alike.
    small = distinct(0, 7, lambda rng: ({"x": (x := rng.choice("ab"))}, f"write {x}"))
    assert sorted(p for _, _, p in small[:2]) == ["write a", "write b"]
    for j, (_, c, prompt) in enumerate(small[2:], 2):
        k = sum(earlier["x"] == c["x"] for _, earlier, _ in small[:j]) + 1
        assert c["variant"] == k and prompt == f"write {c['x']}\n\n(Variant {k} of this request.)"


def test_textbooks_gates_and_dedup_on_planted_answers_and_resume_from_cache(tmp_path):
    from omegaconf import OmegaConf

    from phi1.config import TextbooksConfig

    drawn = textbooks.items(OmegaConf.structured(TextbooksConfig(n=14, output="x")))
    prompts = [m[0]["content"] for _, _, m in drawn]
    topics = [c["topic"] for _, c, _ in drawn]
    planted = {
        0: "I'm sorry, but I can't help with writing that section.",
        1: "Loops repeat code.",  # too short
        2: passage(topics[2], 2).replace("    total = 2\n", "    total = (2\n"),  # code that does not parse
        3: "Sure! Here is the section you asked for.\n\n" + passage(topics[3], 3),
        5: passage(topics[4], 4),  # an exact copy of answer 4
        6: passage(topics[4], 4).replace("Notes:", "Remember these notes:"),  # a near copy of answer 4
        # Longer than llm.max_tokens (512 tokens, 2,048 characters at the server's 4 a token): the API cuts it
        # ("finish_reason": "length"), mid-sentence, and it passed every other gate.
        7: passage(topics[7], 7) + "\n" + "In practice, a loop over the values adds each one to the total. " * 20,
    }
    answers = {p: planted.get(i, passage(topics[i], i)) for i, p in enumerate(prompts)}
    with FakeOpenAI(reply=lambda messages: answers[messages[-1]["content"]]) as server:
        cfg = prepare_cfg(tmp_path, server, "stage=textbooks", "stage.n=14")
        report = run(cfg)
        assert server.count() == 14
        assert report["removed"] == {"refusal": 1, "too_short": 1, "code_does_not_parse": 1, "boilerplate": 1,
                                     "exact_duplicate": 1, "near_duplicate": 1, "truncated": 1}, \
            json.dumps(report["removed"])
        assert report["kept"] == 7 and report["usage"]["completion_tokens"] > 0
        out = tmp_path / "synthetic" / "textbooks"
        rows = [json.loads(line) for line in open(out / "textbooks-s0.jsonl")]
        rejected = [json.loads(line) for line in open(out / "textbooks-s0.rejected.jsonl")]
        assert len(rows) == 7 and len(rejected) == 7  # nothing generated is lost
        cut = next(r for r in rejected if r["rejected"] == "truncated")
        assert cut["finish_reason"] == "length" and len(cut["text"]) == 2048 + 1 and "finish_reason" not in rows[0]
        # To read before training on them: the first 3 kept, then each reason's first, with what was drawn.
        shown = (out / "textbooks-s0.examples.md").read_text()
        assert shown.startswith("# textbooks-s0: 7 kept, 7 removed\n")
        assert re.findall(r"^##+ (?:Kept.*|Removed.*|textbook-.*)$", shown, re.M) == [
            "## Kept (7)", *(f"### {row['id']}" for row in rows[:3]),
            *(line for r in rejected for line in (f"## Removed: {r['rejected']} (1)", f"### {r['id']}"))]
        c = rows[0]["meta"]["constraints"]
        assert f"*topic: {c['topic']}; audience: {c['audience']}; style: {c['style']}; concepts: " \
               f"{', '.join(c['concepts'])}*\n\n````markdown\n{rows[0]['text']}" in shown  # its own fences inside
        assert "I'm sorry, but I can't help" in shown
        by_id = {i: c for i, c, _ in drawn}
        for row in rows:  # the constraints stored are the ones the server was asked with
            assert row["meta"]["constraints"] == by_id[row["id"]]
            assert row["meta"]["constraints"]["topic"] in answers_prompt(server, row["meta"]["constraints"])
        first = (out / "textbooks-s0.jsonl").read_bytes()
        again = run(cfg)  # a rerun asks nothing new and writes the same bytes
        assert server.count() == 14 and again["paid_this_run"]["requests"] == 0
        assert (out / "textbooks-s0.jsonl").read_bytes() == first
        # llm.max_tokens raised, as the truncated row's reason says: only the answer the cap cut is asked again.
        raised = run(prepare_cfg(tmp_path, server, "stage=textbooks", "stage.n=14", "llm.max_tokens=1024"))
        assert server.count() == 15 and raised["paid_this_run"]["requests"] == 1
        assert raised["kept"] == 8 and "truncated" not in raised["removed"]
        rows = [json.loads(line) for line in open(out / "textbooks-s0.jsonl")]
        assert any(row["text"].count("adds each one to the total.") == 20 for row in rows)  # #7, whole
    # the output is a source of data=codetextbook
    from phi1.config import SourceConfig
    from phi1.data.sources import documents

    source = OmegaConf.structured(SourceConfig(name="t", kind="jsonl", path=str(out / "textbooks-s0.jsonl")))
    assert [doc_id for doc_id, _ in documents(source)] == [f"t:{row['id']}" for row in rows]


def answers_prompt(server, constraints) -> str:
    """The prompt the server received for these constraints."""
    for r in server.requests:
        content = r["body"]["messages"][-1]["content"]
        if constraints["topic"] in content and constraints["audience"] in content:
            return content
    raise AssertionError("no request with these constraints reached the server")


EXERCISE = '''Here it is:
```python
from typing import List


def {name}(values: List[int]) -> int:
    """Return the sum of the numbers in values divisible by {k}; a {concept} of zero numbers sums to 0.

    >>> {name}({example})
    {result}
    >>> {name}([])
    0
    """
    return sum(v for v in values if v % {k} == 0){bug}
```'''


def exercise_answers(drawn):
    out = {}
    for i, (_, c, messages) in enumerate(drawn):
        name, k = f"{c['verb']}_multiples_{i}", i + 2
        example = [i * 7 + j for j in range(6)]
        fields = dict(name=name, k=k, concept=c["concept"], example=example,
                      result=sum(v for v in example if v % k == 0), bug="")
        if i == 0:
            fields["bug"] = " + 1"  # the examples fail
        elif i == 4:
            fields["bug"] = f"\n\n\nprint({name}([2]))"  # code outside the function
        text = EXERCISE.format(**fields)
        if i == 1:
            text = text.replace(">>> ", "").replace(f"    {fields['result']}\n", "")  # no examples
        elif i == 2:
            text = text.replace(name, f"xx_{name}")  # not the name asked for
        elif i == 3:
            text = text.replace("-> int:", "-> int")  # does not parse
        elif i == 5:
            text = "As an AI language model, I cannot write exercises."
        elif i == 6:
            text = text.replace("    return sum(", "    while True:  # never returns\n        pass\n    return sum(")
        out[messages[0]["content"]] = text
    return out


def test_exercises_are_parsed_executed_in_the_sandbox_and_humaneval_shaped(tmp_path):
    from omegaconf import OmegaConf

    from phi1.config import ExercisesConfig

    drawn = exercises.items(OmegaConf.structured(ExercisesConfig(n=14, output="x")))
    answers = exercise_answers(drawn)
    with FakeOpenAI(reply=lambda messages: answers[messages[-1]["content"]]) as server:
        report = run(prepare_cfg(tmp_path, server, "stage=exercises", "stage.n=12", "stage.sandbox.timeout=2"))
        assert report["removed"] == {"examples_fail": 2, "name_not_as_asked": 1, "code_does_not_parse": 1,
                                     "code_outside_the_function": 1, "refusal": 1}
        assert report["examples"] == {"checked": 7, "passed": 5, "kept_without_examples": 1, "executed": 7,
                                      "verdicts_reused": 0}
        assert report["kept"] == 6
        path = tmp_path / "synthetic" / "exercises" / "exercises-s0.jsonl"
        shown = path.with_suffix(".examples.md").read_text()  # failing examples shown with what they printed
        failing = shown[shown.index("## Removed: examples_fail (2)"):].split("\n## ")[0]
        assert failing.count("\n### exercises/") == 2 and "Output:" in failing and "Expected:" in failing
        assert "\n````python\nHere it is:\n```python\n" in shown  # an answer's own fence does not end the block
        first = path.read_bytes()
        # A rerun runs no doctest again (one of them times out: 2 s each), and writes the same set; a larger n
        # executes only the new exercises; another timeout executes them all again.
        again = run(prepare_cfg(tmp_path, server, "stage=exercises", "stage.n=12", "stage.sandbox.timeout=2"))
        assert again["examples"]["verdicts_reused"] == 7 and path.read_bytes() == first
        more = run(prepare_cfg(tmp_path, server, "stage=exercises", "stage.n=14", "stage.sandbox.timeout=2"))
        assert more["examples"]["verdicts_reused"] == 7 and more["examples"]["checked"] == 9
        assert more["examples"]["executed"] == 2  # only the two new exercises with examples ran
        assert more["kept"] == 8 and path.read_bytes().startswith(first)
        assert run(prepare_cfg(tmp_path, server, "stage=exercises", "stage.n=14", "stage.sandbox.timeout=2",
                               "stage.sandbox.workers=1"))["examples"]["verdicts_reused"] == 9
        other = run(prepare_cfg(tmp_path, server, "stage=exercises", "stage.n=14", "stage.sandbox.timeout=3"))
        assert other["examples"]["verdicts_reused"] == 0 and other["removed"] == more["removed"]
    rows = [json.loads(line) for line in open(path)]
    import ast

    for row in rows:
        ast.parse(row["prompt"] + row["canonical_solution"])
        assert row["prompt"].startswith("from typing import List") and row["text"] == row["prompt"] + row["canonical_solution"]
    # HumanEval-shaped: loads as a jsonl benchmark, and its check fails a wrong completion
    problems = {p.task_id: p for p in read_jsonl(path)}
    with_examples = next(r for r in rows if r["test"])
    problem = problems[with_examples["task_id"]]
    from phi1.eval.sandbox import Sandbox

    with Sandbox(workers=1) as sandbox:
        assert sandbox.run(problem.program(with_examples["canonical_solution"]))["status"] == "passed"
        assert sandbox.run(problem.program("    return -1\n"))["status"] == "failed"


def test_exercises_checked_chunk_by_chunk_write_the_same_set_and_a_failed_run_leaves_the_last(tmp_path,
                                                                                              monkeypatch):
    """The answers are read back from the cache and the survivors of the cheap gates executed CHUNK at a time
    (bounded memory at the paper's 880K): chunks of 3 must write byte for byte what one chunk writes, and a run
    that fails midway must leave the last complete set and no temporary file."""
    from omegaconf import OmegaConf

    from phi1.config import ExercisesConfig

    answers = exercise_answers(exercises.items(OmegaConf.structured(ExercisesConfig(n=12, output="x"))))
    names = ("exercises-s0.jsonl", "exercises-s0.rejected.jsonl")
    with FakeOpenAI(reply=lambda messages: answers[messages[-1]["content"]]) as server:
        def files(data_dir):
            report = run(prepare_cfg(data_dir, server, "stage=exercises", "stage.n=12", "stage.sandbox.timeout=2"))
            out = data_dir / "synthetic" / "exercises"
            return [(out / name).read_bytes() for name in names], {**report, "output": None}, out

        whole, whole_report, _ = files(tmp_path / "whole")
        monkeypatch.setattr(exercises, "CHUNK", 3)
        chunked, chunked_report, out = files(tmp_path / "chunked")
        assert chunked == whole and chunked_report["kept"] == 6
        assert {k: v for k, v in chunked_report.items() if k != "paid_this_run"} == \
            {k: v for k, v in whole_report.items() if k != "paid_this_run"}
        listing = sorted(p.name for p in out.iterdir())

        split, calls = exercises.split, []

        def split_then_fail(text):
            calls.append(text)
            if len(calls) > 5:
                raise RuntimeError("stopped midway")
            return split(text)

        monkeypatch.setattr(exercises, "split", split_then_fail)
        with pytest.raises(RuntimeError, match="stopped midway"):
            run(prepare_cfg(tmp_path / "chunked", server, "stage=exercises", "stage.n=12"))
    assert sorted(p.name for p in out.iterdir()) == listing  # no temporary file left behind
    assert [(out / name).read_bytes() for name in names] == whole


def test_a_killed_generation_resumes_without_paying_twice(tmp_path):
    def slow(messages):
        time.sleep(0.1)
        return passage(messages[-1]["content"].split("Topic: ")[1].split("\n")[0])

    with FakeOpenAI(reply=slow) as server:
        args = [sys.executable, str(ROOT / "prepare.py"), "stage=textbooks", "stage.n=40", "llm=openai_compatible",
                f"llm.base_url={server.base_url}", "llm.model=test-model", "llm.concurrency=2",
                f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while server.count() < 10:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        paid_before_kill = server.count()
        assert paid_before_kill < 40
        subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True)
        # every request reached the server once; the few in flight at the kill at most twice
        assert server.count() <= 40 + 2
        assert len({json.dumps(r["body"]["messages"]) for r in server.requests}) == 40
    report = json.loads((tmp_path / "synthetic" / "textbooks" / "textbooks-s0.report.json").read_text())
    assert report["answered"] == 40 and report["paid_this_run"]["requests"] <= 40 - paid_before_kill + 2


def test_textbooks_through_the_batch_api_are_sent_once_and_collected_by_a_rerun(tmp_path):
    from omegaconf import OmegaConf

    from phi1.config import TextbooksConfig

    first = textbooks.items(OmegaConf.structured(TextbooksConfig(n=6, output="x")))[0][2][-1]["content"]

    def reply(messages):
        prompt = messages[-1]["content"]
        text = passage(prompt.split("Topic: ")[1].split("\n")[0], zlib.crc32(prompt.encode()))
        return text + "More notes. " * 200 if prompt == first else text  # cut at llm.max_tokens, as below

    batched = ["stage=textbooks", "stage.n=6", "llm.batch=true", "llm.batch_poll_s=0.05"]
    with FakeOpenAI(reply=reply) as server:
        server.hold_batches = True
        with pytest.raises(BatchPending, match="run the same command again"):  # sent, then stop: batch_wait_s=0
            run(prepare_cfg(tmp_path, server, *batched, "llm.batch_wait_s=0"))
        server.hold_batches = False
        run(prepare_cfg(tmp_path, server, *batched))
        assert len(server.batches) == 1 and server.count() == 6  # one batch, each request answered once
    report = json.loads((tmp_path / "synthetic" / "textbooks" / "textbooks-s0.report.json").read_text())
    assert report["answered"] == 6 and report["kept"] == 5 and report["removed"] == {"truncated": 1}


def test_budget_stops_generation_and_dry_run_prices_the_papers_size(tmp_path):
    with FakeOpenAI(reply=lambda m: passage("loops")) as server:
        prices = ["llm.price_input=1000", "llm.price_output=1000"]  # $1e-3 a token: a request costs ~$1
        with pytest.raises(BudgetExceeded):
            run(prepare_cfg(tmp_path, server, "stage=textbooks", "stage.n=30", "llm.budget_usd=5", *prices))
        # what the server billed (its usage: 1 token per 4 characters) stays within the budget
        answer_tokens = len(passage("loops")) // 4 + 1
        billed = sum((sum(len(m["content"]) for m in r["body"]["messages"]) // 4 + 1 + answer_tokens) * 1e-3
                     for r in server.requests)
        assert 0 < server.count() < 30 and billed <= 5
        estimate = run(prepare_cfg(tmp_path, server, "stage=textbooks", "stage.n=30", "stage.dry_run=true",
                                   "stage.target_tokens=1000000000", "llm.price_input=0.5", "llm.price_output=1.5"))
        sent = server.count()
    assert estimate["dry_run"]["requests"] == 30 and estimate["dry_run"]["cached"] == sent
    target = estimate["target"]
    assert target["requests"] == -(-10**9 // 900) and target["completion_tokens"] == target["requests"] * 900
    # 1B output tokens at $1.5/M is $1,500, plus the prompts at $0.5/M
    assert target["dollars"] == pytest.approx(1500 + target["prompt_tokens"] * 0.5 / 1e6, rel=1e-3)
    assert target["prompt_tokens"] > 50 * target["requests"]  # each prompt is a few hundred characters
    # Once all n are generated (cached), the target's prompts are priced the same, not at 0 tokens.
    with FakeOpenAI(reply=lambda m: passage("loops")) as server:
        run(prepare_cfg(tmp_path, server, "stage=textbooks", "stage.n=30"))
        again = run(prepare_cfg(tmp_path, server, "stage=textbooks", "stage.n=30", "stage.dry_run=true",
                                "stage.target_tokens=1000000000", "llm.price_input=0.5", "llm.price_output=1.5"))
    assert again["dry_run"]["cached"] == 30 and again["target"] == target


def test_heuristic_llm_cannot_write_textbooks(tmp_path):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"paths.data_dir={tmp_path}", "stage=textbooks"])
    with pytest.raises(ValueError, match="needs a model: llm=gpt35"):
        run(cfg)
