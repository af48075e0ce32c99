"""Memory and time of the near-duplicate index at the paper's scale: `phi1.data.dedup.Index` (one dict per
band) against datasketch's `MinHashLSH` as the index used it before, over N distinct documents' signatures
(random: none is a near-duplicate, so every one is indexed, the worst case for memory).

    python bench/dedup_index.py                  # 1M documents, threshold 0.8 (data.dedup's default)
    python bench/dedup_index.py --n 100000 --threshold 0.7   # the textbooks stage's setting

Each index is built in its own process; prints its seconds per document and peak RSS growth per document.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(kind: str, n: int, threshold: float, num_perm: int) -> dict:
    from omegaconf import OmegaConf

    from phi1.data import dedup

    rng = np.random.default_rng(0)
    if kind == "datasketch":
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        perm = MinHash(num_perm=num_perm, scheme="affine32").permutations

        def add(i: int, signature: np.ndarray) -> None:
            m = MinHash(hashvalues=signature.astype(np.uint64), permutations=perm, scheme="affine32")
            if not lsh.query(m):
                lsh.insert(i, m, check_duplication=False)
    else:
        index = dedup.Index(OmegaConf.create({"exact": False, "near": True, "threshold": threshold,
                                              "num_perm": num_perm}))

        def add(i: int, signature: np.ndarray) -> None:
            index.add(b"", signature, "s")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = 0.0
    for start in range(0, n, 10_000):  # signatures drawn a block at a time, outside the clock
        block = rng.integers(0, 2**32, (min(10_000, n - start), num_perm), dtype=np.uint64).astype(np.uint32)
        t0 = time.perf_counter()
        for i, signature in enumerate(block, start):
            add(i, signature)
        seconds += time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"index": kind, "documents": n, "threshold": threshold, "us_per_doc": round(seconds / n * 1e6, 1),
            "bytes_per_doc": round(grown / n), "peak_rss_growth_mb": round(grown / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--only", choices=["phi1", "datasketch"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.only:
        print(json.dumps(build(args.only, args.n, args.threshold, args.num_perm)))
        return
    for kind in ("phi1", "datasketch"):
        subprocess.run([sys.executable, __file__, "--only", kind, "--n", str(args.n), "--threshold",
                        str(args.threshold), "--num-perm", str(args.num_perm)], check=True)


if __name__ == "__main__":
    main()
