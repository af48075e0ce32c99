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
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from phi1.config import check, sandbox_checks, synthetic_checks
from phi1.data.sources import exercises as split_functions
from phi1.eval.benchmarks import Problem
from phi1.synthetic import gates
from phi1.synthetic.generate import (apply_gates, dry_run, generate, load_list, load_prompt, make_llm, rng_for,
                                     usage, write)

log = logging.getLogger(__name__)

# HumanEval's `check(candidate)` for an exercise: run the doctest examples of the completed function.
DOCTEST_CHECK = '''def check(candidate):
    import doctest
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(recurse=False).find(candidate, candidate.__name__, globs=dict(globals())):
        runner.run(test, out=lambda _: None)
    assert runner.tries > 0, "no doctest examples"
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} doctest examples failed"
'''


def items(stage: DictConfig) -> list[tuple[str, dict, list[dict]]]:
    lists = {name: load_list(name, stage.lists_version) for name in ("topics", "verbs", "concepts")}
    template = load_prompt("exercise", stage.prompt_version)
    out = []
    for i in range(stage.n):
        rng = rng_for(stage.seed, i)
        constraints = {"topic": rng.choice(lists["topics"]), "verb": rng.choice(lists["verbs"]),
                       "concept": rng.choice(lists["concepts"])}
        out.append((f"exercise-s{stage.seed}-{i:07d}", constraints,
                    [{"role": "user", "content": template.format(**constraints)}]))
    return out


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
    preamble = "".join(code.splitlines(keepends=True)[: first - 1])  # the imports, as HumanEval prompts have
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


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    check([*synthetic_checks(stage), *sandbox_checks("stage.sandbox", stage.sandbox)])
    out = Path(stage.output)
    todo = items(stage)
    version = f"exercise.{stage.prompt_version}+lists.{stage.lists_version}"
    llm = make_llm(cfg, out, "exercises")
    if stage.dry_run:
        return dry_run(llm, todo, stage, version)
    answers = generate(llm, todo, version, "exercises")

    candidates = []
    for item_id, constraints, _ in todo:
        if item_id not in answers:
            continue
        parsed = split(answers[item_id])
        row = {"task_id": f"exercises/{item_id}", "answer": answers[item_id],
               "meta": {"constraints": constraints, "model": llm.model, "prompt_version": stage.prompt_version,
                        "lists_version": stage.lists_version}}
        if isinstance(parsed, dict):
            row.update(prompt=parsed["prompt"], canonical_solution=parsed["solution"],
                       entry_point=parsed["entry_point"], text=parsed["prompt"] + parsed["solution"],
                       test=DOCTEST_CHECK if has_examples(parsed["prompt"]) else "", source="exercises")
        else:
            row["unparsed"] = parsed
        candidates.append(row)

    duplicates = gates.Duplicates(stage.dedup)
    checks = [
        lambda row: gates.refusal(row["answer"]),
        lambda row: row.get("unparsed"),
        lambda row: None if row["entry_point"].startswith(row["meta"]["constraints"]["verb"] + "_")
        else "name_not_as_asked",
        lambda row: gates.length(row["text"], stage.min_chars, stage.max_chars),
        lambda row: "no_examples" if stage.require_examples and not row["test"] else None,
        lambda row: duplicates.check(row["text"]),
    ]
    kept, rejected, reasons = apply_gates(candidates, checks)

    # Execute the examples of the survivors (the costly gate, last); keep only those that pass. A rerun (a larger
    # n, a killed run) takes the verdicts of the programs its last run executed under the same sandbox settings.
    with_examples = [r for r in kept if r["test"]]
    executed, reused = {}, 0
    # What decides a verdict (the number of workers does not: another machine reuses them too)
    sandbox_cfg = {k: v for k, v in OmegaConf.to_container(stage.sandbox, resolve=True).items() if k != "workers"}
    if with_examples and stage.execute:
        from phi1.evaluate import make_sandbox

        programs = {r["task_id"]: _program(r) for r in with_examples}
        earlier = _earlier_verdicts(out, f"exercises-s{stage.seed}", sandbox_cfg)
        for task_id, program in programs.items():
            if (verdict := earlier.get(_digest(program))) is not None:
                executed[task_id] = verdict
        reused = len(executed)
        todo_ex = [task_id for task_id in programs if task_id not in executed]
        if todo_ex:
            with make_sandbox(stage.sandbox) as sandbox, tqdm(total=len(todo_ex), desc="doctests", unit="ex") as bar:
                verdicts = sandbox.run_many([programs[t] for t in todo_ex], progress=bar)
            executed.update(zip(todo_ex, verdicts))
    final = []
    for row in kept:
        verdict = executed.get(row["task_id"])
        row["meta"]["examples"] = "none" if not row["test"] else (verdict["status"] if verdict else "not_run")
        if verdict and verdict["status"] != "passed":
            reasons["examples_fail"] += 1
            rejected.append({**row, "rejected": "examples_fail", "output": verdict.get("output", "")[-2000:]})
        else:
            final.append(row)
    for row in final:
        del row["answer"]  # the parsed fields hold it; rejected rows keep the raw answer for inspection
    report = {
        "requested": len(todo), "answered": len(answers), "unanswered": len(todo) - len(answers),
        "kept": len(final), "removed": dict(reasons),
        # checked: exercises with examples and a verdict; executed: those run in the sandbox by this run, the
        # others' verdicts reused from the last run
        "examples": {"checked": len(executed), "passed": sum(v["status"] == "passed" for v in executed.values()),
                     "kept_without_examples": sum(1 for r in final if not r["test"]),
                     "executed": len(executed) - reused, "verdicts_reused": reused},
        "sandbox": sandbox_cfg,
        "kept_chars": sum(len(r["text"]) for r in final),
        "usage": usage(llm, todo, answers, version), "paid_this_run": llm.summary(),
        "output": str(out / f"exercises-s{stage.seed}.jsonl"),
    }
    log.info("exercises: %d of %d kept; removed %s", len(final), len(todo), dict(reasons))
    return write(out, f"exercises-s{stage.seed}", final, rejected, report)
