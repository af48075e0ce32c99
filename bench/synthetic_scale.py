"""The textbooks stage's own cost at scale: N answers of ~3,900 characters (DESIGN §3: ~900 tokens) put in
the LLM cache, then `prepare.py stage=textbooks` run on them, so nothing is sent and what is timed is reading
the answers back, the gates (near-dedup included) and the writing. The paper's set is ~1M answers.

    python bench/synthetic_scale.py               # 100K answers, ~2 min on 2 cores
    python bench/synthetic_scale.py --n 20000

Prints the stage's wall clock and its process's peak RSS. The answers are random words around one code
block, distinct, so every one passes every gate and is indexed for near-dedup (the worst case for memory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def fill(n: int, data_dir: Path) -> None:
    from hydra import compose, initialize_config_dir

    from phi1.config import register_configs
    from phi1.llm import LLM
    from phi1.synthetic import textbooks

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=["stage=textbooks", "llm=gpt35", f"stage.n={n}",
                                            f"paths.data_dir={data_dir}"])
    version = f"textbook.{cfg.stage.prompt_version}+lists.{cfg.stage.lists_version}"
    llm = LLM.from_config(cfg.llm, cache_path=data_dir / "llm_cache.sqlite",
                          quarantine_path=data_dir / "quarantine.jsonl")
    words = [f"w{i}" for i in range(30_000)]
    rng = random.Random(0)

    def answer(i: int) -> str:
        code = "\n".join(f"    x{j} = {rng.randint(0, 10**6)} + {j}" for j in range(12))
        text = (f"## Section {i}\n\n{' '.join(rng.choices(words, k=420))}\n\n```python\ndef f{i}():\n{code}\n"
                f"    return x0\n```\n\n{' '.join(rng.choices(words, k=120))}")
        return json.dumps({"text": text, "prompt_tokens": 200, "completion_tokens": len(text) // 4})

    rows = ((llm.key(m, version), answer(i)) for i, (_, _, m) in enumerate(textbooks.items(cfg.stage)))
    llm._db.executemany("INSERT INTO responses VALUES (?, ?)", rows)
    llm._db.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="answers (all cached)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        data_dir = Path(d)
        fill(args.n, data_dir)
        env = {**os.environ, "OPENAI_API_KEY": "unused", "HF_HUB_OFFLINE": "1"}  # nothing is sent
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "prepare.py"), "stage=textbooks", "llm=gpt35", f"stage.n={args.n}",
                        f"paths.data_dir={data_dir}", f"hydra.run.dir={data_dir}/run"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        report = json.loads((data_dir / "synthetic/textbooks/textbooks-s0.report.json").read_text())
    assert report["kept"] == args.n and report["paid_this_run"]["requests"] == 0, report
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"answers": args.n, "seconds": round(seconds, 1), "peak_rss_mb": round(peak),
                      "kept_chars": report["kept_chars"]}))


if __name__ == "__main__":
    main()
