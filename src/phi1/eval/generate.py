"""Completions from a model: a Lightning checkpoint, an HF export folder or a hub id.

transformers' batched `generate` with the KV cache (greedy for pass@1, the paper's setting; sampling with
temperature/top-p for pass@k), stopped at stop sequences and truncated there so that a completion never runs
past the function; or vLLM when it is installed and a GPU is present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from phi1 import runs
from phi1.checkpoints import is_checkpoint
from phi1.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

# The Codex paper's stop sequences for HumanEval: anything that starts a new top-level statement.
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


# What AutoTokenizer reads from a folder: the fast tokenizer, its config, or a slow one's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load(ckpt: str, device: str | None = None):
    """(model, tokenizer) in eval mode on `device` (default: CUDA when available)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    path = Path(ckpt).expanduser()
    if is_checkpoint(path):  # written by train.py: a file, or DeepSpeed's folder of shards
        from phi1 import tokenizer as tokenizers
        from phi1.module import LanguageModel

        module = LanguageModel.from_checkpoint(path)
        with tokenizers.of_checkpoint(module, path) as folder:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = module.model.to(dtype)
    elif runs.is_path(str(ckpt)) and not path.exists():
        raise MissingInputError(f"ckpt={ckpt}: no such file or folder")
    else:  # an HF folder or a hub id
        # A folder of weights alone (config.json, model.safetensors) loads without complaint with a tokenizer
        # of 1 token: generation then stops on transformers' "Stop string preprocessing was unable to identify
        # tokens", or, without stop strings, every completion is empty.
        if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
            raise MissingInputError(f"ckpt={ckpt}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)})"
                                    "; train.py's hf/ export has one: copy the model's tokenizer files beside it")
        try:
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(ckpt)
        except OSError as e:
            raise MissingInputError(f"ckpt={ckpt}: not a checkpoint file, an HF export folder or a reachable hub id"
                                    f" ({e})") from e
        embeddings = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > embeddings:  # ids past the embedding table: an index error mid-generation
            raise InputError(f"ckpt={ckpt}: its tokenizer has {len(tokenizer):,} tokens, more than the model's "
                             f"{embeddings:,} embeddings: the two are not from the same model")
    return model.to(device).eval(), tokenizer


def weights_fingerprint(ckpt: str) -> str:
    """What identifies a model for the journal: a local file's or folder's names, sizes and mtimes (a retrained
    model in the same place differs), else the hub id itself."""
    path = Path(ckpt).expanduser()
    files = [path] if path.is_file() else sorted(path.iterdir()) if path.is_dir() else []
    h = hashlib.sha256(str(path.resolve() if files else ckpt).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class Journal:
    """The completions of one evaluation, appended batch by batch to a JSONL file, so that a killed run
    resumes generating only what it lacks (with the same run_name). The first line says what made them (model
    and generation settings); a journal made otherwise is refused, never mixed in. Rows are keyed by a hash of
    the prompt, so `limit` or `task_ids` may change between the runs; raising `generation.n` adds samples."""

    def __init__(self, path: Path, header: dict):
        self.path, self.done = Path(path), {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        if self.path.exists():
            data = self.path.read_bytes()
            # A kill mid-write leaves at most one partial last line (rows are written whole, then flushed).
            data = data[: data.rfind(b"\n") + 1]
            lines = data.decode("utf-8").splitlines()
            if lines and _json_or_none(lines[0]) != header:
                raise InputError(f"{self.path}: its completions were made by {lines[0]}, not by {json.dumps(header)};"
                                 " choose another run_name, or delete the file to start over")
            for line_no, line in enumerate(lines[1:], 2):
                try:
                    row = json.loads(line)
                    self.done.setdefault(row["prompt"], []).append(row["completion"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise InputError(f"{self.path}:{line_no}: not a journal row ({e})") from e
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        self._file = open(self.path, "a", encoding="utf-8")
        if not lines:
            self._file.write(json.dumps(header) + "\n")

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.sha256(prompt.encode()).hexdigest()[:20]

    def add(self, rows: list[tuple[str, str]]) -> None:
        self._file.write("".join(json.dumps({"prompt": self.key(p), "completion": c}) + "\n" for p, c in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def truncate(completion: str, stop: list[str]) -> str:
    cut = min((i for s in stop if (i := completion.find(s)) != -1), default=len(completion))
    return completion[:cut]


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], *, n: int = 1, temperature: float = 0.0, top_p: float = 0.95,
             max_new_tokens: int = 384, stop: list[str] = HUMANEVAL_STOP, batch_size: int = 16, seed: int = 1234,
             journal: Journal | None = None, progress: bool = True) -> list[list[str]]:
    """n completions per prompt, truncated at the first stop sequence; those already in `journal` are taken
    from it, and each new batch is added to it. Sampled (temperature > 0) from `seed`: reproducible."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    # Batches are padded on the left, so that every row's completion starts right after its prompt.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = temperature > 0
    # One stop-string matcher for every batch. Built by transformers per `generate` call from `stop_strings`,
    # it costs ~0.65 s for a 51,200-token vocabulary (a table over every token, 2 cores), and transformers'
    # cache of it never hits with a `tokenizers`-backed tokenizer: the key is the vocabulary in `get_vocab()`
    # order, which differs per call. HumanEval's 11 batches of 16 paid ~7 s for it, MBPP's 32 ~20 s.
    stopping = StoppingCriteriaList([StopStringCriteria(tokenizer, stop)]) if stop else None
    out: list[list[str]] = [list(journal.done.get(journal.key(p), [])[:n]) if journal else [] for p in prompts]
    if any(out):
        log.info("resuming: %d of %d completions from %s", sum(map(len, out)), n * len(prompts), journal.path)
    # Every (problem, sample) in a fixed order, longest prompts first (batches of similar length waste less
    # padding), cut into the same batches whether or not the run resumes: a resumed run skips the batches its
    # journal holds and samples the others from the same seeds, so it writes what an uninterrupted run writes.
    jobs = sorted(((i, p, j) for i, p in enumerate(prompts) for j in range(n)), key=lambda job: -len(job[1]))
    batches = [(b, [job for job in jobs[start : start + batch_size] if job[2] >= len(out[job[0]])])
               for b, start in enumerate(range(0, len(jobs), batch_size))]
    devices = [model.device] if model.device.type == "cuda" else []
    for b, chunk in tqdm([(b, chunk) for b, chunk in batches if chunk], desc="generate", unit="batch",
                         dynamic_ncols=True, disable=not progress):
        enc = tokenizer([p for _, p, _ in chunk], return_tensors="pt", padding=True).to(model.device)
        # Sampling draws from batch b's own seed, on a forked generator: the same command samples the same
        # completions, and a training run's random state (dropout, data order) is left as it was.
        with torch.random.fork_rng(devices, enabled=sampling):
            if sampling:
                torch.manual_seed(random.Random(f"{seed}:{b}").getrandbits(63))
            generated = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=sampling,
                temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                stopping_criteria=stopping, pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(generated[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        new = [(i, p, truncate(text, stop)) for (i, p, _), text in zip(chunk, texts)]
        for i, _, completion in new:
            out[i].append(completion)
        if journal is not None:
            journal.add([(p, completion) for _, p, completion in new])
    return out


def generate_vllm(ckpt: str, prompts: list[str], *, n: int, temperature: float, top_p: float,
                  max_new_tokens: int, stop: list[str], seed: int = 1234) -> list[list[str]]:
    import tempfile

    from vllm import LLM, SamplingParams

    # vLLM reads HF folders: train.py's checkpoint (file or folder) is exported first, into a folder removed when
    # the completions are in (it was left behind: phi-1's fp32 weights are 5.7 GB, in the temporary folder, per
    # evaluation).
    with tempfile.TemporaryDirectory(prefix="phi1-vllm-") as tmp:
        if is_checkpoint(Path(ckpt)):
            from phi1.export import export_checkpoint

            ckpt = str(export_checkpoint(Path(ckpt), Path(tmp) / "hf"))
        llm = LLM(model=ckpt, dtype="bfloat16")
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, stop=stop, seed=seed)
        return [[truncate(o.text, stop) for o in r.outputs] for r in llm.generate(prompts, params)]


def solution_nll(model, tokenizer, problems) -> float:
    """Mean per-token negative log-likelihood of the canonical solutions given their prompts (nats/token).

    A continuous stand-in for pass@1 at scales where pass@1 is 0 (DESIGN §4): it falls as a model learns to
    write the reference code. Tokens are counted over all problems together (a token-weighted mean).
    """
    return nll_mean(solution_nll_terms(model, tokenizer, problems))


def nll_mean(terms: dict[str, tuple[float, int]]) -> float:
    """The token-weighted mean of per-problem (nats, tokens) terms."""
    return sum(n for n, _ in terms.values()) / max(sum(t for _, t in terms.values()), 1)


@torch.inference_mode()
def solution_nll_terms(model, tokenizer, problems, progress: bool = True,
                       context: int | None = None) -> dict[str, tuple[float, int]]:
    """task_id -> (summed NLL in nats, solution tokens) for each of `problems` with a solution: ranks' shares
    merge, and report.py bounds a difference over the problems from them. `context`: each token is predicted
    from at most context - 1 tokens before it (the sequence length the model was trained on), not the whole
    prompt: a model trained on 256-token sequences has never seen position 300, and 33% of HumanEval's solution
    tokens lie past position 256 (45 of its 164 problems, with the mini reproduction's 4K BPE)."""
    terms = {}
    for p in tqdm(problems, desc="solution NLL", unit="problem", dynamic_ncols=True, disable=not progress):
        # Prompt and solution tokenized apart and joined, so the solution's tokens are the same whatever
        # the prompt ends with.
        prompt = tokenizer(p.prompt, return_tensors="pt").input_ids
        solution = tokenizer(p.canonical_solution, return_tensors="pt").input_ids
        if solution.numel() == 0:
            continue
        ids = torch.cat([prompt, solution], dim=1).to(model.device)[0]
        start, n = prompt.shape[1], len(ids)
        whole = n if context is None else min(n, context)
        nats = 0.0
        if start < whole:  # the tokens within the first `context`: one pass
            logits = model(input_ids=ids[None, :whole], use_cache=False).logits[0, start - 1 : whole - 1].float()
            nats += torch.nn.functional.cross_entropy(logits, ids[start:whole], reduction="sum").item()
        # Each later token from the context - 1 tokens before it, one window each, 32 at a time. One pass with a
        # banded attention mask is not the same: each layer widens what a token sees (layer 2 of the window's
        # first token attends to tokens before the window), 1e-3 nats off per token on the mini models.
        later = list(range(max(start, whole), n))
        for i in range(0, len(later), 32):
            windows = torch.stack([ids[t - context + 1 : t + 1] for t in later[i : i + 32]])
            logits = model(input_ids=windows, use_cache=False).logits[:, -2].float()
            nats += torch.nn.functional.cross_entropy(logits, windows[:, -1], reduction="sum").item()
        terms[p.task_id] = (nats, solution.numel())
    return terms
