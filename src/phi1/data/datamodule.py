"""The LightningDataModule that feeds packed tokens to training, in an order that survives a resume.

Training order is a pure function of (seed, global sample index): pass e over the N windows of seq_len + 1
tokens visits them in the permutation drawn from seed and e; optimizer step s consumes global samples
[s·B, (s+1)·B) (B = global batch), rank r the r-th contiguous slice of them. A resumed run therefore starts at
sample (global step)·B and sees exactly the sequences an uninterrupted run would have: none repeated, none
skipped, whatever the number of ranks. The seed, the samples consumed and the data's sha256 are saved in the
checkpoint and checked on resume.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from phi1 import tokenizer as tokenizers
from phi1.config import Plan
from phi1.data import pack
from phi1.errors import Phi1Error

log = logging.getLogger(__name__)

# Fewer held-out documents than this and val/loss is the loss of those few files, not of the data: the mini
# reproduction's filtered stdlib (682 files, data.val_fraction 0.01) holds out 2 (1,090 tokens), and its six
# runs' final val/loss sat 0.2-0.8 above their last training loss, where the unfiltered stdlib's 15 documents
# (25,765 tokens) gave a val/loss within 0.15 of it.
MIN_VAL_DOCUMENTS = 10


class DataMismatchError(Phi1Error, RuntimeError):
    pass


class TokenWindows(Dataset):
    """Window i = tokens[i·T : i·T + T + 1]: T inputs and their T next-token targets."""

    def __init__(self, path: Path, dtype: str, seq_len: int):
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max((len(self.tokens) - 1) // self.seq_len, 0)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))


class StepSampler(Sampler[int]):
    """Indices for optimizer steps [start_step, max_steps) on one rank (see the module docstring)."""

    def __init__(self, n: int, seed: int, global_batch: int, max_steps: int, rank: int, world: int):
        self.n, self.seed, self.global_batch, self.max_steps = n, seed, global_batch, max_steps
        self.rank, self.per_rank = rank, global_batch // world
        self.start_step = 0
        self._pass, self._perm = -1, None

    def __len__(self) -> int:
        # The whole run, also when resuming: Lightning counts the batches it already did against this length.
        return self.max_steps * self.per_rank

    def index(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n)
        if epoch != self._pass:
            self._pass, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[pos])

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            first = step * self.global_batch + self.rank * self.per_rank
            for k in range(self.per_rank):
                yield self.index(first + k)


class PackedData(L.LightningDataModule):
    def __init__(self, cfg: DictConfig, plan: Plan):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        self.tokenizer_dir = tokenizers.location(cfg)
        self.model_vocab = cfg.model.vocab_size
        self._resume_state: dict | None = None

    def prepare_data(self) -> None:
        tokenizers.ensure(self.cfg)
        pack.pack(self.cfg, self.tokenizer_dir)

    def setup(self, stage: str) -> None:
        self.tokenizer = tokenizers.load(self.tokenizer_dir, self.cfg)
        if self.model_vocab is not None and len(self.tokenizer) > self.model_vocab:
            raise DataMismatchError(
                f"the tokenizer has {len(self.tokenizer)} tokens but model.vocab_size={self.model_vocab}"
            )
        self.dir = pack.location(self.cfg, self.tokenizer_dir)
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        packed_with = self.manifest["tokenizer"]["fingerprint"]
        if packed_with != tokenizers.fingerprint(self.tokenizer_dir):
            raise DataMismatchError(
                f"{self.dir} was packed with tokenizer {packed_with}, not {tokenizers.fingerprint(self.tokenizer_dir)}"
                f" ({self.tokenizer_dir}); delete the folder to repack"
            )
        seq_len = self.cfg.data.seq_len
        self.train_set = TokenWindows(self.dir / "train.bin", self.manifest["dtype"], seq_len)
        self.val_set = TokenWindows(self.dir / "val.bin", self.manifest["dtype"], seq_len)
        val_documents = sum(source.get("val", {}).get("documents", 0) for source in self.manifest.get("sources", []))
        for name, split in (("train", self.train_set), ("val", self.val_set)):
            if len(split) == 0:
                held = f"{val_documents} document{'' if val_documents == 1 else 's'} held out"
                fix = (f"raise data.val_fraction (now {self.cfg.data.val_fraction:g}: {held}; a new pack)"
                       if name == "val" else "add documents to data.sources")
                raise DataMismatchError(
                    f"{self.dir}: the {name} split has {len(split.tokens)} tokens, less than one window of"
                    f" data.seq_len + 1 = {seq_len + 1}: {fix}, or lower data.seq_len"
                )
        if val_documents < MIN_VAL_DOCUMENTS:
            log.warning("data: the validation split of %s holds %d documents (%s tokens, %d windows): val/loss is "
                        "their loss, a noisy estimate that can sit far from the training loss. "
                        "data.val_fraction=%g sets the share held out (by document id: a new pack, with fewer "
                        "training documents)", self.dir.name, val_documents, f"{len(self.val_set.tokens):,}",
                        len(self.val_set), self.cfg.data.val_fraction)
        self.epochs = self.passes(self.plan.max_steps)
        log.info("data: %s windows of %d tokens in %s; the budget reads %.2f passes over them%s",
                 f"{len(self.train_set):,}", seq_len, self.dir.name, self.epochs,
                 " (repeated: every window once per pass, each pass in a new order)" if self.epochs > 1 else "")

    def passes(self, steps: int) -> float:
        """How many times `steps` optimizer steps read the training windows (phi-1-base: ~8 over CodeTextbook)."""
        return round(steps * self.cfg.batch.global_size / len(self.train_set), 4)

    def train_dataloader(self) -> DataLoader:
        sampler = StepSampler(
            len(self.train_set), self.cfg.seed, self.cfg.batch.global_size, self.plan.max_steps,
            self.trainer.global_rank, self.trainer.world_size,
        )
        consumed = self._resume_state["consumed_samples"] if self._resume_state else 0
        sampler.start_step = consumed // self.cfg.batch.global_size
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, None)

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        # Reading a window from the memory map is a copy of a few KB: worker processes would cost more
        # than they save, so the main process loads.
        return DataLoader(
            dataset, batch_size=self.cfg.batch.micro_size, sampler=sampler, shuffle=False, num_workers=0,
            pin_memory=torch.cuda.is_available(),
        )

    def state_dict(self) -> dict:
        return {**data_order(self.cfg, self.manifest),
                "consumed_samples": self.trainer.global_step * self.cfg.batch.global_size}

    def load_state_dict(self, state: dict) -> None:
        check_resumable(state, self.cfg, self.manifest, self.dir.name)
        self._resume_state = state


def data_order(cfg: DictConfig, manifest: dict) -> dict:
    """What the order of the training windows is drawn from: the seed and the global batch, over the training
    tokens of the pack whose manifest this is."""
    return {"seed": cfg.seed, "train_sha256": manifest["splits"]["train"]["sha256"],
            "global_batch": cfg.batch.global_size}


def check_resumable(state: dict, cfg: DictConfig, manifest: dict, packed: str) -> None:
    """A checkpoint's data state (PackedData.state_dict) against this run's data order, over the pack named
    `packed` (its manifest)."""
    for key, value in data_order(cfg, manifest).items():
        if state[key] != value:
            # The training tokens differ where the sources' files changed since (a filter run again, a corpus
            # edited): the run's config is the same, its data not.
            data = (f" (data.sources pack into {packed} now, other tokens: their files changed since). "
                    "Resume it on the data it trained on, or start a new run from its weights with "
                    "init_from=<the checkpoint> run_name=<a new name>") if key == "train_sha256" else ""
            raise DataMismatchError(
                f"cannot resume: the checkpoint was trained with {key}={state[key]!r}, this run has {value!r}" + data)
