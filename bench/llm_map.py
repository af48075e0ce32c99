"""The LLM client's own cost at the paper's scale: `LLM.map` over N requests whose answers are all cached, so
that nothing is sent and what is timed is the client (cache lookups, scheduling, parsing, the progress bar).
The paper's synthetic textbooks are ~1M requests (DESIGN §3: <1B tokens at ~900 tokens each).

    python bench/llm_map.py                 # 1M requests, ~1 min on 2 cores
    python bench/llm_map.py --n 200000

Prints the wall clock of the map and the growth of the process's peak RSS during it (the prompts and the
cache are built before, and not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from phi1.llm import LLM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="requests (all cached)")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "unused")  # nothing is sent: every answer is in the cache
    with tempfile.TemporaryDirectory() as d:
        llm = LLM(model="m", base_url="http://127.0.0.1:9/v1", concurrency=args.concurrency,
                  cache_path=f"{d}/cache.sqlite", quarantine_path=f"{d}/quarantine.jsonl")
        items = [(str(i), [{"role": "user", "content": f"write textbook passage {i}"}]) for i in range(args.n)]
        answer = json.dumps({"text": "1", "prompt_tokens": 1, "completion_tokens": 1})
        llm._db.executemany("INSERT INTO responses VALUES (?, ?)", ((llm.key(m), answer) for _, m in items))
        llm._db.commit()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        results = llm.map(items, parse=int, desc="llm_map")
        elapsed = time.perf_counter() - t0
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(results) == args.n and llm.stats.cached == args.n and llm.stats.requests == 0
    print(json.dumps({"requests": args.n, "concurrency": args.concurrency, "seconds": round(elapsed, 1),
                      "requests_per_s": round(args.n / elapsed), "peak_rss_growth_mb": round(grown)}))


if __name__ == "__main__":
    main()
