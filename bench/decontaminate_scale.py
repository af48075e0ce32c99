"""Time of the contamination study (prepare.py stage=decontaminate) against HumanEval's 164 problems, for the
standard library's documented functions and for a synthetic set of 100K exercises, and the recall of its
candidate pruning (MinHash LSH over AST shingles) against the exhaustive AST match rate on a sample.

    python bench/decontaminate_scale.py                 # ~5 min on 2 cores
    python bench/decontaminate_scale.py --n 20000       # quicker

The synthetic set: stdlib functions with their names, variables and constants rewritten (seeded), so that
it is as varied as real code and as large as asked; 1 in 500 is a renamed HumanEval solution, a planted
contamination the study must find. Embeddings are off for the 100K run (the encoder, not the study, would
dominate on a CPU; `stage.embed.device=cuda` makes them cheap).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Rename(ast.NodeTransformer):
    def __init__(self, rng):
        self.rng = rng

    def visit_Name(self, node):
        node.id = f"v{self.rng.randrange(10**6)}" if node.id not in dir(__builtins__) else node.id
        return node

    def visit_arg(self, node):
        node.arg = f"a{self.rng.randrange(10**6)}"
        return node


def synthetic(n: int, seed: int = 0) -> list[dict]:
    from omegaconf import OmegaConf

    from phi1.config import SourceConfig
    from phi1.data.sources import documents
    from phi1.eval.benchmarks import humaneval

    base = [t for _, t in documents(OmegaConf.structured(SourceConfig(name="s", kind="stdlib_functions",
                                                                      on_error="skip")))]
    problems = humaneval()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 500 == 0:
            p = problems[(i // 500) % len(problems)]
            tree = ast.parse(p.prompt + p.canonical_solution)
        else:
            tree = ast.parse(rng.choice(base))
        tree = _Rename(rng).visit(tree)
        rows.append({"id": f"syn-{i}", "text": ast.unparse(tree) + "\n"})
    return rows


def run_stage(train_overrides: list[str], data_dir: Path, embed: bool) -> dict:
    from hydra import compose, initialize_config_dir

    from phi1.config import register_configs
    from phi1.stages import run

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"paths.data_dir={data_dir}", "stage=decontaminate",
                                            f"stage.embed.enabled={str(embed).lower()}", *train_overrides])
    t0 = time.perf_counter()
    summary = run(cfg)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return summary


def recall(rows: list[dict], sample: int, seed: int = 1) -> tuple[int, int]:
    """Of the sampled (item, problem) pairs with exhaustive τ >= 0.8, how many are LSH candidates."""
    from datasketch import MinHashLSH
    from omegaconf import OmegaConf

    from phi1.contamination import measures
    from phi1.contamination.decontaminate import _minhash
    from phi1.data.dedup import Signer
    from phi1.eval.benchmarks import humaneval

    problems = [measures.ast_labels(p.prompt + p.canonical_solution) for p in humaneval()]
    signer = Signer(OmegaConf.create({"num_perm": 64, "ngram": 3}))
    lsh = MinHashLSH(threshold=0.5, num_perm=64)
    for j, labels in enumerate(problems):
        lsh.insert(j, _minhash(signer, labels))
    rng = random.Random(seed)
    close = found = 0
    for row in rng.sample(rows, min(sample, len(rows))) + [r for r in rows if int(r["id"][4:]) % 500 == 0]:
        labels = measures.ast_labels(row["text"])
        if not labels:
            continue
        candidates = set(lsh.query(_minhash(signer, labels)))
        for j, p in enumerate(problems):
            if measures.match_rate(labels, p) >= 0.8:
                close += 1
                found += j in candidates
    return found, close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="size of the synthetic exercise set")
    parser.add_argument("--recall-sample", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stdlib = run_stage([], tmp, embed=True)
        print(f"stdlib functions: {stdlib['train_items']:,} items x 164 problems in {stdlib['wall_s']} s "
              f"(study {stdlib['elapsed_s']} s, with MiniLM embeddings; {stdlib['workers']} workers); "
              f"removed at τ 0.95..0.80: {[v['removed'] for v in stdlib['per_tau'].values()]}")
        t0 = time.perf_counter()
        rows = synthetic(args.n)
        (tmp / "syn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"synthetic set: {len(rows):,} items written in {time.perf_counter() - t0:.1f} s")
        big = run_stage(["stage.train.name=synthetic", "stage.train.kind=jsonl", f"stage.train.path={tmp}/syn.jsonl"],
                        tmp, embed=False)
        print(f"synthetic: {big['train_items']:,} items x 164 problems in {big['wall_s']} s (study "
              f"{big['elapsed_s']} s, {big['items_per_s']:,} items/s, {big['workers']} workers); removed at "
              f"τ 0.95..0.80: {[v['removed'] for v in big['per_tau'].values()]} (planted: {len(rows) // 500})")
        found, close = recall(rows, args.recall_sample)
        print(f"candidate recall: {found} of {close} sampled pairs with τ >= 0.8 were LSH candidates")


if __name__ == "__main__":
    main()
