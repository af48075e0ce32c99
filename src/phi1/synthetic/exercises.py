"""The exercises stage (paper §2.2): CodeExercises-style problems, a function's signature and docstring followed
by its solution, written by GPT-3.5 or any OpenAI-compatible model. Diversity as in the paper, by constraining
the function's name (a leading verb from `lists/verbs`) and its topic, plus a concept word. The paper made
~180M tokens (879.5K exercises).

Each answer's code must parse into exactly one documented function (imports allowed before it), named as
asked. Exercises whose docstring has doctest examples (>>>) are executed in the evaluation sandbox and kept
only if every example passes. Output: HumanEval-shaped JSONL (`task_id`, `prompt`, `canonical_solution`,
`entry_point`, `test`, plus `text` = prompt + solution for training) that `data=codeexercises` packs and
`evaluate.py` can score as a `jsonl` benchmark (rows with examples carry a `check` that runs them).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import itertools
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from phi1 import lock
from phi1.config import check, sandbox_checks, synthetic_checks
from phi1.data.sources import exercises as split_functions, source_lines
from phi1.eval.benchmarks import Problem
from phi1.synthetic import gates
from phi1.synthetic.generate import (Output, answers, distinct, dry_run, first_failure, generate, load_list,
                                     load_prompt, make_llm, priced, unfinished)

log = logging.getLogger(__name__)

# HumanEval's `check(candidate)` for an exercise: run the doctest examples of the completed function. A failure
# says which example and what it gave (doctest's report, its first 1,000 characters): "2 of 2 failed" alone left
# a rejected exercise's reader to guess whether the example or the code was wrong.
DOCTEST_CHECK = '''def check(candidate):
    import doctest
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in doctest.DocTestFinder(recurse=False).find(candidate, candidate.__name__, globs=dict(globals())):
        runner.run(test, out=report.append)
    assert runner.tries > 0, "no doctest examples"
    assert runner.failures == 0, \\
        f"{runner.failures} of {runner.tries} doctest examples failed\\n" + "".join(report)[:1000]
'''


def items(stage: DictConfig) -> list[tuple[str, dict, list[dict]]]:
    lists = {name: load_list(name, stage.lists_version) for name in ("topics", "verbs", "concepts")}
    template = load_prompt("exercise", stage.prompt_version)

    def draw(rng) -> tuple[dict, str]:
        constraints = {"topic": rng.choice(lists["topics"]), "verb": rng.choice(lists["verbs"]),
                       "concept": rng.choice(lists["concepts"])}
        return constraints, template.format(**constraints)

    return [(f"exercise-{suffix}", constraints, [{"role": "user", "content": prompt}])
           for suffix, constraints, prompt in distinct(stage.seed, stage.n, draw)]


def split(text: str) -> dict | str:
    """{"prompt", "solution", "entry_point"} from an answer, or the reason it is not one exercise."""
    blocks = gates.python_blocks(text)
    code = blocks[0] if blocks else text
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return "code_does_not_parse"
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if len(functions) != 1:
        return "not_one_function"
    (function,) = functions
    if any(not isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body if n is not function):
        return "code_outside_the_function"  # top-level tests or prints would run on import
    parts = list(split_functions(code))
    if not parts:
        return "no_docstring_or_body"
    name, prompt, solution = parts[0]
    first = min([function.lineno] + [d.lineno for d in function.decorator_list])
    preamble = "".join(source_lines(code)[: first - 1])  # the imports, as HumanEval prompts have
    return {"prompt": preamble + prompt, "solution": solution, "entry_point": name}


def has_examples(prompt: str) -> bool:
    return ">>>" in prompt


def _program(row: dict) -> str:
    """What the sandbox runs for an exercise: its prompt and solution, then its doctest check."""
    return Problem(row["task_id"], row["prompt"], f"{row['test']}\n\ncheck({row['entry_point']})").program(
        row["canonical_solution"])


def _digest(program: str) -> str:
    return hashlib.sha256(program.encode()).hexdigest()


def _earlier_verdicts(out: Path, name: str, sandbox_cfg: dict) -> dict[str, dict]:
    """{program digest: verdict} of the last run's executed exercises (kept: passed; rejected: examples_fail,
    with their output), if it ran under these sandbox settings: a longer timeout may pass what timed out."""
    report = out / f"{name}.report.json"
    if not report.is_file() or json.loads(report.read_text()).get("sandbox") != sandbox_cfg:
        return {}
    verdicts = {}
    for path in (out / f"{name}.jsonl", out / f"{name}.rejected.jsonl"):
        if not path.is_file():
            continue
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                status = row.get("meta", {}).get("examples")
                if row.get("test") and status not in (None, "none", "not_run") and \
                        row.get("rejected") in (None, "examples_fail"):
                    verdicts[_digest(_program(row))] = {"status": status, "output": row.get("output", "")}
    return verdicts


def _row(item_id: str, constraints: dict, answer: str, meta: dict) -> dict:
    parsed = split(answer)
    row = {"task_id": f"exercises/{item_id}", "answer": answer, "meta": {"constraints": constraints, **meta}}
    if isinstance(parsed, dict):
        row.update(prompt=parsed["prompt"], canonical_solution=parsed["solution"], entry_point=parsed["entry_point"],
                   text=parsed["prompt"] + parsed["solution"],
                   test=DOCTEST_CHECK if has_examples(parsed["prompt"]) else "", source="exercises")
    else:
        row["unparsed"] = parsed
    return row


# Exercises that passed the cheap gates wait in a temporary file and are executed CHUNK at a time: the paper's
# 880K would otherwise be held whole (answer, prompt, solution and text each: ~3 KB apiece), and 4,096 keeps
# the sandbox's workers busy between chunks.
CHUNK = 4096


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    check([*synthetic_checks(stage), *sandbox_checks("stage.sandbox", stage.sandbox)])
    # Per seed: seeds are separate sets (<stage>-s<seed>.jsonl), which may be generated at once.
    with lock.stage_output(Path(stage.output) / f"exercises-s{stage.seed}", "exercises"):
        return _run(cfg)


def _run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    out = Path(stage.output)
    todo = items(stage)
    version = f"exercise.{stage.prompt_version}+lists.{stage.lists_version}"
    llm = make_llm(cfg, out, "exercises")
    if stage.dry_run:
        return dry_run(llm, todo, stage, version)
    answered = generate(llm, todo, version, "exercises")

    # The config's values read once: OmegaConf's attribute access costs ~27 us, per gate and row
    min_chars, max_chars, require_examples, execute = (stage.min_chars, stage.max_chars, stage.require_examples,
                                                       stage.execute)
    meta = {"model": llm.model, "prompt_version": stage.prompt_version, "lists_version": stage.lists_version}
    duplicates = gates.Duplicates(stage.dedup)
    checks = [
        unfinished,
        lambda row: gates.refusal(row["answer"]),
        lambda row: row.get("unparsed"),
        lambda row: None if row["entry_point"].startswith(row["meta"]["constraints"]["verb"] + "_")
        else "name_not_as_asked",
        lambda row: gates.length(row["text"], min_chars, max_chars),
        lambda row: "no_examples" if require_examples and not row["test"] else None,
        lambda row: duplicates.check(row["text"]),
    ]
    name = f"exercises-s{stage.seed}"
    # What decides a verdict (the number of workers does not: another machine reuses them too)
    sandbox_cfg = {k: v for k, v in OmegaConf.to_container(stage.sandbox, resolve=True).items() if k != "workers"}
    # A rerun (a larger n, a killed run) takes the verdicts of the programs its last run executed under the same
    # sandbox settings.
    earlier = _earlier_verdicts(out, name, sandbox_cfg) if execute else {}
    usage, counts = Counter(), Counter()
    with Output(out, name, language="python") as output, tempfile.TemporaryFile("w+", dir=out) as pending:
        # The cheap gates first, in order (the first of near-duplicates is kept); the survivors wait in `pending`.
        for item_id, constraints, answer, finish in tqdm(answers(llm, todo, answered, version, usage),
                                                         total=len(answered), desc="gates", unit="ex"):
            row = _row(item_id, constraints, answer, meta)
            if finish:
                row["finish_reason"] = finish
            if reason := first_failure(row, checks):
                output.reject(row, reason)
                continue
            pending.write(json.dumps(row) + "\n")
            if row["test"] and execute and _digest(_program(row)) not in earlier:
                counts["to_execute"] += 1
        # Then the costly gate: the doctest examples of the survivors, run in the sandbox; kept only if they pass.
        pending.seek(0)
        sandbox = contextlib.nullcontext()
        if counts["to_execute"]:
            from phi1.evaluate import make_sandbox  # it imports torch (~4 s): only when there is code to run

            sandbox = make_sandbox(stage.sandbox)
        with sandbox, tqdm(total=counts["to_execute"], desc="doctests", unit="ex",
                           disable=not counts["to_execute"]) as bar:
            for chunk in iter(lambda: list(itertools.islice(pending, CHUNK)), []):
                rows = [json.loads(line) for line in chunk]
                programs = {r["task_id"]: _program(r) for r in rows if r["test"] and execute}
                verdicts = {t: v for t, p in programs.items() if (v := earlier.get(_digest(p))) is not None}
                counts["verdicts_reused"] += len(verdicts)
                if run_now := [t for t in programs if t not in verdicts]:
                    verdicts.update(zip(run_now, sandbox.run_many([programs[t] for t in run_now], progress=bar)))
                for row in rows:
                    verdict = verdicts.get(row["task_id"])
                    row["meta"]["examples"] = ("none" if not row["test"] else
                                               verdict["status"] if verdict else "not_run")
                    if verdict:
                        counts["checked"] += 1
                        counts["passed"] += verdict["status"] == "passed"
                    if verdict and verdict["status"] != "passed":
                        output.reject(row, "examples_fail", output=verdict.get("output", "")[-2000:])
                        continue
                    del row["answer"]  # the parsed fields hold it; rejected rows keep the raw answer for inspection
                    output.keep(row)
                    counts["kept_without_examples"] += not row["test"]
        report = {
            "requested": len(todo), "answered": len(answered), "unanswered": len(todo) - len(answered),
            "kept": output.kept, "removed": dict(output.reasons),
            # checked: exercises with examples and a verdict; executed: those run in the sandbox by this run, the
            # others' verdicts reused from the last run
            "examples": {"checked": counts["checked"], "passed": counts["passed"],
                         "kept_without_examples": counts["kept_without_examples"],
                         "executed": counts["checked"] - counts["verdicts_reused"],
                         "verdicts_reused": counts["verdicts_reused"]},
            "sandbox": sandbox_cfg,
            "kept_chars": output.kept_chars,
            "usage": priced(llm, usage), "paid_this_run": llm.summary(),
            "output": str(out / f"{name}.jsonl"),
        }
        log.info("exercises: %d of %d kept; removed %s", output.kept, len(todo), dict(output.reasons))
        return output.finish(report)
