"""Packing speed and memory: `prepare.py stage=pack` against the tokenizer's own ceiling and a datasets.map
baseline, and its peak RSS at 1x and 10x the corpus (issue: data at paper scale).

    python bench/pack_throughput.py                 # ~100 MB of Python, 51,200-token BPE; ~15 min on 2 cores
    python bench/pack_throughput.py --mb 20 --copies 3   # quicker

Corpus: the Python files of this interpreter's standard library and site-packages (real code), copied into
copy0/ until `--mb` MB; copy1..copy9/ are the same files with a first line `# copy k`, so exact dedup keeps them
and the 10x corpus is 10x the tokens. Measured:
  ceiling    `tokenizers` encode_batch_fast on the texts already in memory (no reading, no writing), in a
             process of its own
  pack       `python prepare.py stage=pack` on copy0/, wall clock of the whole process (start-up included),
             and the tokens/s it reports for the packing itself. Every rate is the ceiling's token count of the
             corpus over the time taken, since all three tokenize the same text: pack's manifest counts fewer
             (exact duplicates are dropped after they were tokenized: 131 of 7,969 files, 1.1% of the tokens
             of the 100 MB corpus) plus one EOS per document
  baseline   datasets, in a process of its own: read the files, Dataset.from_dict(texts) -> .map(tokenize,
             batched) -> .map(concatenate and chunk into 2048-token blocks) -> save_to_disk: the recipe of
             transformers' run_clm.py, with its default num_proc=None (one process; the tokenizer's own threads
             use both cores) and with num_proc=2 (two processes; datasets turns the tokenizer's threads off in
             them). Timed two ways: the two maps alone (texts in memory: no start-up, reading or writing; the
             strictest comparison) and end to end, the process's wall clock, as pack is timed
  RSS        peak resident memory of the pack process and its worker processes together (sampled every
             20 ms) at 1x (copy0/) and 10x (all copies)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_corpus(work: Path, mb: float, copies: int) -> tuple[Path, int]:
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    first = work / "corpus" / "copy0"
    if not first.exists():
        size = 0
        for root in roots:
            for path in sorted(root.rglob("*.py")):
                if size >= mb * 1e6:
                    break
                try:
                    data = path.read_bytes()
                    data.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                dst = first / root.name / path.relative_to(root)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
                size += len(data)
    files = sorted(p for p in first.rglob("*.py"))
    for k in range(1, copies):
        folder = work / "corpus" / f"copy{k}"
        if folder.exists():
            continue
        for path in files:
            dst = folder / path.relative_to(first)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f"# copy {k}\n".encode() + path.read_bytes())
    return first, sum(p.stat().st_size for p in files)


def overrides(work: Path, corpus: Path, name: str) -> list[str]:
    return [
        "stage=pack", f"paths.data_dir={work}/data", f"hydra.run.dir={work}/runs/{name}",
        f"data.name={name}", "data.val_fraction=0.001", "data.dedup.exact=true", "data.dedup.near=false",
        f"data.sources=[{{name: code, kind: dir, path: '{corpus}', on_error: skip}}]",
        "tokenizer.name=bench-bpe51k", "tokenizer.vocab_size=51200", "tokenizer.corpus.kind=dir",
        f"tokenizer.corpus.path={work}/corpus/copy0", "tokenizer.corpus.limit=null",
    ]


def tree_rss(argv: list[str]) -> None:
    """Run argv and print its peak resident memory, that of the process and its workers together: their RSS
    summed every 20 ms (pack encodes in worker processes; ru_maxrss would give only the largest one). Runs in
    a small parent process of its own (`--rss`), because a child forked from the benchmark's (large) process
    would count that process's pages until it execs."""
    proc = subprocess.Popen(argv)
    page = os.sysconf("SC_PAGE_SIZE")
    peak, tick, tree = 0, 0, [proc.pid]
    while proc.poll() is None:
        if tick % 25 == 0:  # the process tree every 0.5 s: a scan of /proc costs ~2.4 ms, the RSS reads little
            children: dict[int, list[int]] = {}
            for entry in os.listdir("/proc"):
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
                except OSError:
                    continue
                if stat:
                    children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            tree, todo = [], [proc.pid]
            while todo:
                tree.append(todo.pop())
                todo += children.get(tree[-1], [])
        total = 0
        for pid in tree:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            except OSError:
                pass
        peak = max(peak, total)
        tick += 1
        time.sleep(0.02)
    print("MAXRSS_KB", peak // 1024)
    sys.exit(proc.returncode)


def run_pack(work: Path, corpus: Path, name: str) -> dict:
    """prepare.py stage=pack in a child process: wall time, peak RSS, the tokens/s it logged."""
    shutil.rmtree(work / "data" / "packed", ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, __file__, "--rss", sys.executable, str(ROOT / "prepare.py"), *overrides(work, corpus, name)]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout
    if proc.returncode != 0:
        sys.exit(f"prepare.py stage=pack failed:\n{out[-3000:]}")
    (manifest_path,) = (work / "data" / "packed").glob(f"{name}-*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    rates = re.findall(r"([\d,]+) tokens/s", out)
    return {
        "wall_s": wall, "peak_rss_mb": int(re.findall(r"MAXRSS_KB (\d+)", out)[-1]) / 1024,
        "tokens": sum(manifest["splits"][s]["tokens"] for s in ("train", "val")),
        "reported_tokens_per_s": int(rates[-1].replace(",", "")) if rates else None,
    }


def texts_of(corpus: Path) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(corpus.rglob("*.py"))]


def ceiling(tokenizer_dir: Path, corpus: Path) -> dict:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = texts_of(corpus)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 512):
        n += sum(len(e.ids) for e in backend.encode_batch_fast(texts[i : i + 512], False))
    return {"seconds": time.perf_counter() - t0, "tokens": n}


def datasets_baseline(tokenizer_dir: Path, corpus: Path, num_proc: int | None, block: int = 2048) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tokenizer.eos_token_id
    texts = texts_of(corpus)

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    def group(batch):  # transformers' run_clm.py: concatenate, drop the remainder, cut into blocks
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // block * block
        return {"input_ids": [flat[i : i + block] for i in range(0, n, block)]}

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        ds = datasets.Dataset.from_dict({"text": texts})
        ds = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"],
                    cache_file_name=f"{cache}/tok.arrow")
        ds = ds.map(group, batched=True, batch_size=1000, num_proc=num_proc, cache_file_name=f"{cache}/grouped.arrow")
        seconds = time.perf_counter() - t0
        ds.save_to_disk(f"{cache}/saved")  # what training reads: part of the end-to-end time only
        return {"seconds": seconds, "tokens": len(ds) * block}  # tokens kept in whole blocks


def measure(kind: str, tokenizer_dir: Path, corpus: Path) -> dict:
    """Run `kind` (ceiling; baseline1 / baseline2: datasets.map with num_proc=None / 2) in a fresh process, so
    that each measurement starts from the same state (datasets sets TOKENIZERS_PARALLELISM=false in the process
    environment for its workers and leaves it there, which made every later in-process ceiling
    single-threaded); the texts are read before the clock starts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(tokenizer_dir), str(corpus)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def main() -> None:
    if sys.argv[1:2] == ["--rss"]:
        return tree_rss(sys.argv[2:])
    if sys.argv[1:2] == ["--child"]:  # one measurement in its own process (see measure)
        kind, tokenizer_dir, corpus = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
        result = (ceiling(tokenizer_dir, corpus) if kind == "ceiling" else
                  datasets_baseline(tokenizer_dir, corpus, num_proc=None if kind == "baseline1" else 2))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="size of the 1x corpus in MB")
    parser.add_argument("--copies", type=int, default=10, help="the large corpus is this many times the 1x one")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of ceiling, pack and the baselines")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temp dir, removed)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="phi1-pack-bench-"))
    try:
        corpus, size = build_corpus(work, args.mb, args.copies)
        print(f"corpus: {size / 1e6:.1f} MB of Python in {corpus} (x{args.copies} for the memory test)")

        from hydra import compose, initialize_config_dir

        from phi1 import tokenizer as tokenizers
        from phi1.config import register_configs

        register_configs()
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("prepare", overrides=[o for o in overrides(work, corpus, "bench1x")
                                                if not o.startswith("hydra.")])
        t0 = time.perf_counter()
        tokenizer_dir = tokenizers.ensure(cfg)
        print(f"tokenizer: {cfg.tokenizer.vocab_size:,}-token byte-level BPE ({time.perf_counter() - t0:.1f} s to "
              "train or load)")

        # This machine's speed drifts by ±20% over minutes (shared cores): alternate the measurements and
        # compare medians, so that all three see the same conditions.
        ceil_rates, pack_rates, base1_rates, base2_rates, rss = [], [], [], [], []
        e2e1_rates, e2e2_rates = [], []  # the baselines end to end: tokens / the process's wall clock
        for r in range(args.rounds):
            ceil = measure("ceiling", tokenizer_dir, corpus)
            ceil_rates.append(ceil["tokens"] / ceil["seconds"])
            one = run_pack(work, corpus, "bench1x")
            pack_rates.append(ceil["tokens"] / one["wall_s"])  # same text, same tokens (see the docstring)
            rss.append(one["peak_rss_mb"])
            base1 = measure("baseline1", tokenizer_dir, corpus)
            base1_rates.append(ceil["tokens"] / base1["seconds"])
            e2e1_rates.append(ceil["tokens"] / base1["wall_s"])
            base2 = measure("baseline2", tokenizer_dir, corpus)
            base2_rates.append(ceil["tokens"] / base2["seconds"])
            e2e2_rates.append(ceil["tokens"] / base2["wall_s"])
            print(f"round {r + 1}: ceiling {ceil_rates[-1]:,.0f} tokens/s ({ceil['tokens']:,} tokens in "
                  f"{ceil['seconds']:.1f} s, encode_batch_fast on texts in memory); pack {pack_rates[-1]:,.0f} tokens/s "
                  f"({one['wall_s']:.1f} s, whole process, {one['tokens']:,} tokens kept; packing alone reports "
                  f"{one['reported_tokens_per_s']:,}); peak RSS {one['peak_rss_mb']:.0f} MB; datasets.map + group into "
                  f"2048-token blocks {base1_rates[-1]:,.0f} tokens/s ({base1['seconds']:.1f} s; end to end "
                  f"{base1['wall_s']:.1f} s), with num_proc=2 {base2_rates[-1]:,.0f} tokens/s ({base2['seconds']:.1f} s; "
                  f"end to end {base2['wall_s']:.1f} s)", flush=True)
        ceil_rate, pack_rate, rss_one = statistics.median(ceil_rates), statistics.median(pack_rates), statistics.median(rss)

        def ratio(mine: list[float], *theirs: list[float]) -> str:
            # Per round, against the faster of `theirs` measured in that round: the machine's speed drifts by
            # ±20% over minutes, less within a round than across rounds. The median, and the range.
            values = sorted(m / max(t[i] for t in theirs) for i, m in enumerate(mine))
            return f"{statistics.median(values):.2f}  (rounds {values[0]:.2f}-{values[-1]:.2f})"


        big = run_pack(work, work / "corpus", "bench10x")
        print(f"pack x{args.copies}  {big['tokens']:,} tokens in {big['wall_s']:.1f} s = "
              f"{big['tokens'] / big['wall_s']:,.0f} tokens/s; peak RSS {big['peak_rss_mb']:.0f} MB")

        print(f"\nmedians of {args.rounds}: ceiling {ceil_rate:,.0f}, pack {pack_rate:,.0f}, datasets.map "
              f"{statistics.median(base1_rates):,.0f} (num_proc=None), {statistics.median(base2_rates):,.0f} "
              f"(num_proc=2) tokens/s; end to end {statistics.median(e2e1_rates):,.0f} / "
              f"{statistics.median(e2e2_rates):,.0f} tokens/s; peak RSS x1 {rss_one:.0f} MB")
        print(f"pack / ceiling          {ratio(pack_rates, ceil_rates)}   goal >= 0.90")
        print(f"pack / datasets.map     {ratio(pack_rates, base1_rates, base2_rates)}   goal >= 2; the faster of the two "
              "baselines, its maps alone against pack's whole process")
        print(f"pack / datasets, e2e    {ratio(pack_rates, e2e1_rates, e2e2_rates)}   goal >= 2; both whole processes, "
              "files in, blocks on disk out")
        print(f"RSS x{args.copies} / RSS x1        {big['peak_rss_mb'] / rss_one:.2f}   (goal <= 1.2)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
