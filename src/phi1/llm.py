"""The LLM client every stage that calls a model goes through (annotation, synthetic data, grading).

The official `openai` client with a configurable `base_url` (OpenAI, Azure OpenAI's v1 endpoint, vLLM, TGI,
any OpenAI-compatible server), used asynchronously with a bound on requests in flight, and around it:
- retries with exponential backoff that honour `Retry-After`; the SDK's own retries are off
  (`max_retries=0`), so ours are the only ones and are counted; `insufficient_quota` and authentication
  errors stop the run at once (retrying cannot help);
- a persistent SQLite cache keyed by model, the full messages, the sampling parameters and the prompt
  version: a rerun or a resumed run never pays twice for the same request, and an answer that ended within
  max_tokens also serves the same request under a larger one;
- a budget in tokens and dollars, counted from each response's `usage` and checked before each request
  against what is spent plus the worst case of what is in flight, so that it is never exceeded;
- `estimate()`, a dry run that prices a stage before anything is sent;
- a progress bar with requests/s, tokens/s and dollars; answers that fail or do not parse are written to a
  quarantine file with the reason, never guessed;
- `batch=True`: OpenAI's Batch API instead of one request at a time (half the price, its own rate limits,
  answers within 24 h). The batches sent are recorded in the cache before anything else happens, so a run
  stopped while they are processed (killed, or `batch_wait_s` elapsed) collects them when run again and never
  sends them twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
from tqdm.auto import tqdm

from phi1.config import check as check_keys
from phi1.errors import Phi1Error

log = logging.getLogger(__name__)

# OpenAI bills Batch API requests at half the list price (platform.openai.com/docs/guides/batch).
BATCH_DISCOUNT = 0.5
# The Batch API's limits on one input file: 50,000 requests and 200 MB (kept under, with room for the framing).
BATCH_MAX_REQUESTS = 50_000
BATCH_MAX_BYTES = 190_000_000
# A batch in any other status is still being processed by OpenAI.
BATCH_DONE = ("completed", "failed", "expired", "cancelled")
_OPEN = f"status NOT IN ({','.join(repr(s) for s in BATCH_DONE)})"  # SQL: the batches not yet collected

# ~4 characters per token for English and code with OpenAI's tokenizers: the rule of thumb OpenAI gives,
# good enough to price a stage before running it and to reserve budget for a request in flight.
CHARS_PER_TOKEN = 4


# Seconds a cache write waits for another process's write to end before giving up (LLM.__post_init__).
CACHE_WAIT_S = 300.0

# File systems that several hosts mount (/proc/mounts' type field), where SQLite's WAL mode must not be used.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.ceph", "glusterfs",
                       "fuse.glusterfs", "fuse.sshfs", "9p", "panfs", "wekafs"}


def filesystem(path: str | Path, mounts: str = "/proc/mounts") -> str:
    """The type of the file system that holds `path` (its longest mount point in `mounts`); "" where unknown."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:  # not Linux
        return ""
    return kind


class LLMError(Phi1Error, RuntimeError):
    pass


class QuotaExceeded(LLMError):
    pass


class BudgetExceeded(LLMError):
    pass


class AuthError(LLMError):
    pass


class Unreachable(LLMError):
    """Request after request got no answer however often it was retried: the server is down or llm.base_url
    is wrong. Trying the remaining requests would take minutes each (the retries' backoff) and answer none."""


class _Stopped(Exception):
    """A request given up between two retries because the run stopped: not sent again, not quarantined."""


class BatchPending(LLMError):
    """Batches sent to OpenAI are still being processed; the same command run again collects them."""


class ParseError(ValueError):
    """Raised by a stage's parser when an answer does not have the expected form."""


def api_key(api_key_env: str, base_url: str | None) -> str:
    """The key in $api_key_env; a server at base_url may need none. Raises AuthError naming the variable."""
    key = os.environ.get(api_key_env) or ("unused" if base_url else None)
    if key is None:
        raise AuthError(f"no API key: set {api_key_env} (or point base_url at a server that needs none)")
    return key


def check(c) -> None:
    """An `llm` config entry's values, before any request: an entry without a model (llm=openai_compatible leaves
    it to the user) sent requests naming none, which the server refused only after every retry; no workers
    (concurrency 0) sent nothing and ended "done" with empty outputs."""
    if not c.model:
        raise LLMError(f"llm.model: llm={c.name} needs the name of the model to ask (llm.model=<name>: the one "
                       f"the server at {c.base_url or 'OpenAI'} serves)")
    check_keys([("llm.concurrency", c.concurrency >= 1, "must be >= 1 (requests in flight at once)"),
                ("llm.max_retries", c.max_retries >= 0, "must be >= 0"),
                ("llm.timeout", c.timeout > 0, "must be > 0 (seconds per request)"),
                ("llm.max_tokens", c.max_tokens >= 1, "must be >= 1"),
                ("llm.temperature", 0 <= c.temperature <= 2, "must be in [0, 2] (the API's range)"),
                ("llm.price_input", c.price_input >= 0, "must be >= 0 (dollars per million tokens)"),
                ("llm.price_output", c.price_output >= 0, "must be >= 0 (dollars per million tokens)"),
                ("llm.budget_usd", c.budget_usd is None or c.budget_usd > 0, "must be > 0 (null: no budget)"),
                ("llm.budget_tokens", c.budget_tokens is None or c.budget_tokens > 0, "must be > 0 (null: no budget)"),
                ("llm.batch_poll_s", c.batch_poll_s > 0, "must be > 0 (seconds between status checks)"),
                ("llm.batch_wait_s", c.batch_wait_s is None or c.batch_wait_s >= 0,
                 "must be >= 0 (0: send and stop; null: wait until done)")])


def last_grade(pattern, answer: str, expected: str) -> tuple[int, str]:
    """(N, the text before it) for the last match of `pattern` (one group: an N/10 grade) in a judge's answer.
    An answer without one, or with N outside 0-10, raises ParseError naming `expected`: never guessed."""
    matches = list(pattern.finditer(answer or ""))
    if not matches:
        raise ParseError(f"no '{expected}' line")
    grade = int(matches[-1].group(1))
    if not 0 <= grade <= 10:
        raise ParseError(f"grade {grade} is outside 0-10")
    return grade, answer[: matches[-1].start()].strip()[:2000]


@dataclass
class Stats:
    requests: int = 0  # sent to the server, retries included
    cached: int = 0
    retries: int = 0
    failed: int = 0
    quarantined: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dollars: float = 0.0


@dataclass
class LLM:
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 6
    timeout: float = 60.0
    max_backoff: float = 60.0
    # Sampling parameters sent with every request (and part of the cache key).
    params: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 512})
    # Dollars per million tokens; 0 for local servers.
    price_input: float = 0.0
    price_output: float = 0.0
    budget_usd: float | None = None
    budget_tokens: int | None = None
    cache_path: str = "llm_cache.sqlite"
    quarantine_path: str = "quarantine.jsonl"
    # The Batch API (module docstring): seconds between status checks; how long to wait for the batches (None:
    # until they finish; 0: send them and stop, to collect later with the same command).
    batch: bool = False
    batch_poll_s: float = 60.0
    batch_wait_s: float | None = None
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self):
        # The HTTP client under openai (httpx, httpx2 in newer releases) logs an INFO line per request: a million
        # lines in the stage's log for the paper's textbooks. The progress bar counts them; failures are logged.
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.params = dict(self.params)
        Path(self.cache_path).parent.mkdir(parents=True, exist_ok=True)
        # Every stage of a data_dir shares this cache (annotation, textbooks, exercises, grading), and so do the
        # processes running them at once. A write waits for the one in progress: collecting a full batch writes
        # ~50,000 answers (~190 MB) in one transaction, 1.8 s on a local disk here and longer on a shared one,
        # where sqlite3's default wait of 5 s stopped the other stages with "database is locked", their answers
        # received and paid for but not stored.
        self._db = sqlite3.connect(self.cache_path, timeout=CACHE_WAIT_S)
        # WAL lets the stages of one host read the cache while one writes; its index is shared memory, which
        # processes on other hosts do not share (sqlite.org/wal.html: "WAL does not work over a network
        # filesystem"): textbook seeds generated by Slurm jobs on several nodes into one data_dir corrupted it.
        # There, the rollback journal and the file system's locks.
        network = filesystem(self.cache_path) in NETWORK_FILESYSTEMS
        self._db.execute(f"PRAGMA journal_mode={'DELETE' if network else 'WAL'}")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)")
        # Batches sent (their worst-case cost, reserved against the budget until collected) and which batch
        # holds each request: a rerun waits for those instead of sending them again.
        self._db.execute("CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, status TEXT NOT NULL,"
                         " requests INTEGER NOT NULL, reserved_tokens INTEGER NOT NULL, reserved_dollars REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS batch_requests (key TEXT PRIMARY KEY, batch TEXT NOT NULL,"
                         " item TEXT NOT NULL)")
        # Each request sent, under its key without max_tokens (`base`): an answer that ended on its own is the
        # answer under any larger max_tokens too (_lookup).
        self._db.execute("CREATE TABLE IF NOT EXISTS capless (key TEXT PRIMARY KEY, base TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS capless_base ON capless (base)")
        self._reserved_tokens = 0
        self._reserved_dollars = 0.0
        self._quarantined: set[str] | None = None  # the quarantine file's rows, read at its first write

    @classmethod
    def from_config(cls, c, cache_path, quarantine_path) -> LLM:
        """From an `llm` config group entry (conf/llm/*.yaml); every stage that calls a model builds it here."""
        check(c)
        return cls(model=c.model, base_url=c.base_url, api_key_env=c.api_key_env, concurrency=c.concurrency,
                   max_retries=c.max_retries, timeout=c.timeout,
                   params={"temperature": c.temperature, "max_tokens": c.max_tokens},
                   price_input=c.price_input, price_output=c.price_output, budget_usd=c.budget_usd,
                   budget_tokens=c.budget_tokens, cache_path=str(cache_path), quarantine_path=str(quarantine_path),
                   batch=c.batch, batch_poll_s=c.batch_poll_s, batch_wait_s=c.batch_wait_s)

    # -- pricing and budget ------------------------------------------------------------------------------

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        dollars = (prompt_tokens * self.price_input + completion_tokens * self.price_output) / 1e6
        return dollars * BATCH_DISCOUNT if self.batch else dollars

    def prompt_tokens(self, messages: list[dict]) -> int:
        """The prompt's tokens, estimated from its characters (no tokenizer of the model at hand)."""
        return sum(len(m["content"]) for m in messages) // CHARS_PER_TOKEN + 1

    def _worst_case(self, messages: list[dict]) -> tuple[int, int]:
        return self.prompt_tokens(messages), int(self.params.get("max_tokens") or 4096)

    def estimate(self, requests: list[list[dict]], output_tokens: int | None = None, prompt_version: str = "") -> dict:
        """Dry run: tokens and dollars for these requests, nothing sent. Cached ones cost nothing; without
        `output_tokens`, every answer is priced at max_tokens (the worst case)."""
        uncached = [m for m in requests if self._lookup(self.key(m, prompt_version), m, prompt_version, adopt=False)
                    is None]
        prompt = sum(self._worst_case(m)[0] for m in uncached)
        completion = len(uncached) * (output_tokens if output_tokens is not None else self._worst_case([])[1])
        return {"requests": len(requests), "cached": len(requests) - len(uncached), "prompt_tokens": prompt,
                "completion_tokens": completion, "dollars": round(self.cost(prompt, completion), 4)}

    def _reserve(self, messages: list[dict]) -> tuple[int, float]:
        prompt, completion = self._worst_case(messages)
        tokens, dollars = prompt + completion, self.cost(prompt, completion)
        s = self.stats
        if self.budget_tokens is not None and \
                s.prompt_tokens + s.completion_tokens + self._reserved_tokens + tokens > self.budget_tokens:
            raise BudgetExceeded(f"token budget {self.budget_tokens:,} would be exceeded "
                                 f"(spent {s.prompt_tokens + s.completion_tokens:,})")
        if self.budget_usd is not None and s.dollars + self._reserved_dollars + dollars > self.budget_usd:
            raise BudgetExceeded(f"budget ${self.budget_usd:.2f} would be exceeded (spent ${s.dollars:.4f})")
        self._reserved_tokens += tokens
        self._reserved_dollars += dollars
        return tokens, dollars

    # -- cache ----------------------------------------------------------------------------------------------

    def key(self, messages: list[dict], prompt_version: str = "", capped: bool = True) -> str:
        params = self.params if capped else {k: v for k, v in self.params.items() if k != "max_tokens"}
        blob = json.dumps({"model": self.model, "messages": messages, "params": params,
                           "prompt_version": prompt_version}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _lookup(self, key: str, messages: list[dict], prompt_version: str, adopt: bool = True) -> dict | None:
        """The cached answer to this request; else one to the same request under another max_tokens that ended
        on its own (finish_reason "stop") within this one: a cap only cuts an answer, so one that ended before
        it is an answer to the request under any larger cap. Raising llm.max_tokens to keep the textbooks the
        cap cut (paper §2.2's ~1B tokens of GPT-3.5) then pays for those alone, not for every answer again.
        Adopted under this request's key."""
        if (response := self._cached(key)) is not None:
            return response
        cap, base = self.params.get("max_tokens"), self.key(messages, prompt_version, capped=False)
        for (text,) in self._db.execute("SELECT r.response FROM capless c JOIN responses r ON r.key = c.key"
                                        " WHERE c.base = ?", (base,)).fetchall():
            response = json.loads(text)
            if response.get("finish_reason") == "stop" and (not cap or response["completion_tokens"] <= cap):
                if adopt:
                    self._store(key, response, base)
                return response
        return None

    def _cached(self, key: str) -> dict | None:
        row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def cached_response(self, messages: list[dict], prompt_version: str = "") -> dict | None:
        """{"text", "prompt_tokens", "completion_tokens", "finish_reason"} of an answer already received (no
        finish_reason in those cached before it was kept), else None."""
        return self._cached(self.key(messages, prompt_version))

    def _store(self, key: str, response: dict, base: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(response)))
        self._db.execute("INSERT OR REPLACE INTO capless VALUES (?, ?)", (key, base))
        self._db.commit()  # at once: a run killed a moment later has still paid for this one only once

    def _parse(self, item_id: str, response: dict, parse: Callable[[str], Any], results: dict) -> None:
        """results[item_id] = the parsed answer, or the answer quarantined with why it did not parse."""
        try:
            results[item_id] = parse(response["text"])
        except ParseError as e:
            # A grade cut off at the end of an answer that reached max_tokens: raising it is the fix.
            cut = (f" (the answer was cut at max_tokens={self.params.get('max_tokens')}: raise llm.max_tokens)"
                   if response.get("finish_reason") == "length" else "")
            self._quarantine(item_id, f"unparseable: {e}{cut}", response["text"])

    def _quarantine(self, item_id: str, reason: str, text: str | None) -> None:
        self.stats.quarantined += 1
        row = json.dumps({"id": item_id, "reason": reason, "answer": text, "model": self.model})
        path = Path(self.quarantine_path)
        if self._quarantined is None:
            # A cached answer that does not parse fails again on every rerun: its row is written once, not once per
            # run (the file counted each such answer as often as the stage had been run).
            self._quarantined = set(path.read_text().splitlines()) if path.exists() else set()
        if row in self._quarantined:
            return
        self._quarantined.add(row)
        path.parent.mkdir(parents=True, exist_ok=True)  # a stage's output, before it writes
        with open(path, "a") as f:
            f.write(row + "\n")

    # -- requests -------------------------------------------------------------------------------------------

    def _api_key(self) -> str:
        return api_key(self.api_key_env, self.base_url)

    def _client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=self._api_key(), base_url=self.base_url, max_retries=0, timeout=self.timeout)

    async def _request(self, client: openai.AsyncOpenAI, messages: list[dict], stop: list | None = None) -> dict:
        """The answer, retried as the error allows; a run that stopped meanwhile (`stop`) ends the retries."""
        error = ""
        for attempt in range(self.max_retries + 1):
            try:
                self.stats.requests += 1
                response = await client.chat.completions.create(model=self.model, messages=messages, **self.params)
                usage, choice = response.usage, response.choices[0]
                return {"text": choice.message.content or "",
                        "prompt_tokens": usage.prompt_tokens if usage else 0,
                        "completion_tokens": usage.completion_tokens if usage else 0,
                        "finish_reason": choice.finish_reason}
            except openai.RateLimitError as e:
                error = f"RateLimitError: {e.message}"
                if getattr(e, "code", None) == "insufficient_quota":
                    raise QuotaExceeded(f"{self.model}: insufficient quota ({e.message}); nothing more is sent") from e
                wait = _retry_after(e) or self._backoff(attempt)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise AuthError(f"{self.model} at {self.base_url or 'OpenAI'}: {e.message}") from e
            except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError) as e:
                wait = self._backoff(attempt)
                error = f"{type(e).__name__}: {e}"
                log.debug("retrying after %s", error)
            except openai.APIStatusError as e:
                error = f"HTTP {e.status_code}: {e.message}"
                if e.status_code >= 500 or e.status_code == 408:
                    wait = self._backoff(attempt)
                else:
                    raise LLMError(f"{self.model}: HTTP {e.status_code}: {e.message}") from e
            if attempt == self.max_retries:
                break
            await asyncio.sleep(wait)
            if stop:  # the run stopped while this request waited for its retry
                raise _Stopped
            self.stats.retries += 1
        raise LLMError(f"{self.model}: no answer after {self.max_retries + 1} attempts (the last: {error})")

    def _backoff(self, attempt: int) -> float:
        # 1, 2, 4, ... s with ±25% jitter so that many clients do not retry in step
        return min(self.max_backoff, 2**attempt) * random.uniform(0.75, 1.25)

    def map(self, items: list[tuple[str, list[dict]]], parse: Callable[[str], Any], prompt_version: str = "",
            desc: str = "llm") -> dict[str, Any]:
        """Ask every (id, messages); return {id: parse(answer)} for the answers that parse. Failures and
        unparseable answers go to the quarantine file. Stops (raising) on quota, auth or budget errors,
        after the answers already received are cached."""
        if self.batch:
            return self._map_batches(items, parse, prompt_version, desc)
        in_batches = self._open_batches()
        if waiting := [in_batches[k] for k in {self.key(m, prompt_version) for _, m in items} if k in in_batches]:
            # Sent one at a time, they would be paid for twice: once here, once when the batch completes.
            raise LLMError(f"{len(waiting)} of these requests are in Batch API batches still open at OpenAI"
                           f" ({', '.join(sorted(set(waiting))[:3])}): rerun with llm.batch=true to collect them (a batch"
                           " cancelled at OpenAI is collected as it stands)")
        return asyncio.run(self._map(items, parse, prompt_version, desc))

    def _open_batches(self) -> dict[str, str]:
        """{cache key: batch id} of the requests in batches not yet collected."""
        return dict(self._db.execute(
            f"SELECT r.key, r.batch FROM batch_requests r JOIN batches b ON r.batch = b.id WHERE b.{_OPEN}").fetchall())

    async def _map(self, items, parse, prompt_version, desc) -> dict[str, Any]:
        results: dict[str, Any] = {}
        client = self._client()
        t0 = time.perf_counter()
        bar = tqdm(total=len(items), desc=desc, unit="req", dynamic_ncols=True)
        stop: list[BaseException] = []
        # Requests that got no answer after every retry, since the last one answered: as many in a row as are
        # sent at once is an outage or a wrong base_url, not a request the server cannot answer. Without this
        # stop a 100K-request annotation at a mistyped base_url spent ~1 min of retries on each request.
        unanswered: list[str] = []
        answered: list[str] = []  # from the server or the cache

        # Requests on their way, by cache key: an item asking what another is already asking waits for that
        # answer (two documents of the same text, in flight together, were each paid for).
        sending: dict[str, asyncio.Event] = {}

        async def fetch(item_id: str, messages: list[dict], key: str) -> dict | None:
            """The server's answer, paid, counted and cached; None when there is none to give."""
            try:
                tokens, dollars = self._reserve(messages)
            except BudgetExceeded as e:
                stop.append(e)
                return None
            try:
                response = await self._request(client, messages, stop)
            except (QuotaExceeded, AuthError) as e:
                stop.append(e)
                return None
            except _Stopped:
                return None
            except LLMError as e:
                self.stats.failed += 1
                self._quarantine(item_id, str(e), None)
                unanswered.append(str(e))
                if len(unanswered) >= max(self.concurrency, 2) and not stop:
                    stop.append(self._unreachable(f"{len(unanswered)} requests in a row got", unanswered))
                return None
            finally:
                self._reserved_tokens -= tokens
                self._reserved_dollars -= dollars
            unanswered.clear()
            s = self.stats
            s.prompt_tokens += response["prompt_tokens"]
            s.completion_tokens += response["completion_tokens"]
            s.dollars += self.cost(response["prompt_tokens"], response["completion_tokens"])
            self._store(key, response, self.key(messages, prompt_version, capped=False))
            return response

        async def one(item_id: str, messages: list[dict]) -> None:
            key = self.key(messages, prompt_version)
            while key in sending:
                await sending[key].wait()
            response = self._lookup(key, messages, prompt_version)
            if response is not None:
                self.stats.cached += 1
            else:
                sending[key] = asyncio.Event()
                try:
                    response = await fetch(item_id, messages, key)
                finally:
                    sending.pop(key).set()
                if response is None:
                    return
            answered.append(item_id)
            self._parse(item_id, response, parse, results)
            bar.update(1)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            s = self.stats
            # refresh=False: update() redraws at most every 0.1 s; a forced redraw per answer wrote one line per
            # request into a batch job's log (200K lines for 200K cached answers, and a third of their time)
            bar.set_postfix_str(f"{s.requests / elapsed:.1f} req/s, "
                                f"{(s.prompt_tokens + s.completion_tokens) / elapsed:,.0f} tok/s, ${s.dollars:.4f}",
                                refresh=False)

        # `concurrency` workers take the requests in turn, rather than one task per request up front: for 1M
        # cached answers (the paper's ~1M textbooks) those took 1.09 GB and 63 s on 2 cores, the workers 155 MB
        # (the answers, parsed) and 19 s (bench/llm_map.py).
        todo = iter(items)

        async def worker() -> None:
            for item_id, messages in todo:
                if stop:
                    return
                await one(item_id, messages)

        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            bar.close()
            await client.close()
        if not stop and unanswered and not answered:
            # Fewer requests than are sent at once (a trial run's few documents), none answered: the stage would
            # otherwise end "done" with empty outputs.
            n = len(unanswered)
            stop.append(self._unreachable("the one request got" if n == 1 else f"all {n} requests got", unanswered,
                                          rest=False))
        if stop:
            raise stop[0]
        return results

    def _unreachable(self, how_many: str, errors: list[str], rest: bool = True) -> Unreachable:
        stopped = "; stopped rather than send the rest" if rest else ""
        return Unreachable(f"{self.model} at {self.base_url or 'OpenAI'}: {how_many} no answer (the last: "
                           f"{errors[-1]}){stopped}. Is the server up, and llm.base_url and llm.model right? The "
                           "answers received are cached: the same command sends only the others.")

    # -- the Batch API -----------------------------------------------------------------------------------------

    def _map_batches(self, items, parse, prompt_version, desc) -> dict[str, Any]:
        keyed = [(item_id, messages, self.key(messages, prompt_version)) for item_id, messages in items]
        in_flight = self._open_batches()
        todo, waiting = {}, set()
        for item_id, messages, key in keyed:
            if key in in_flight:
                waiting.add(in_flight[key])
            elif key not in todo and self._lookup(key, messages, prompt_version) is None:
                todo[key] = (item_id, messages)
        self.stats.cached = sum(1 for *_, key in keyed if key not in todo and key not in in_flight)
        # Reserve each request's worst case against the budget, with the batches still open counted as spent.
        spent_tokens, spent_dollars = self._db.execute(
            f"SELECT COALESCE(SUM(reserved_tokens), 0), COALESCE(SUM(reserved_dollars), 0) FROM batches"
            f" WHERE {_OPEN}").fetchone()
        self._reserved_tokens, self._reserved_dollars = spent_tokens, spent_dollars
        affordable, over_budget = [], None
        for key, (item_id, messages) in todo.items():
            try:
                self._reserve(messages)
            except BudgetExceeded as e:
                over_budget = e
                break
            affordable.append((key, item_id, messages))
        client = self._sync_client()
        try:
            waiting |= self._send_batches(client, affordable, desc, prompt_version)
            self._wait_for_batches(client, sorted(waiting), desc)
        finally:
            client.close()
            self._reserved_tokens, self._reserved_dollars = 0, 0.0
        results: dict[str, Any] = {}
        for item_id, _, key in keyed:
            response = self._cached(key)
            if response is None:  # failed in its batch: quarantined when the batch was collected
                continue
            self._parse(item_id, response, parse, results)
        if over_budget:
            raise BudgetExceeded(f"{over_budget}: {len(todo) - len(affordable)} of {len(todo)} requests were not"
                                 " sent (the answers received are cached; raise the budget and rerun)")
        return results

    def _sync_client(self) -> openai.OpenAI:
        # The SDK's retries here: these are a handful of file and status calls, not the requests themselves.
        return openai.OpenAI(api_key=self._api_key(), base_url=self.base_url, max_retries=self.max_retries,
                             timeout=self.timeout)

    def _send_batches(self, client: openai.OpenAI, requests: list[tuple[str, str, list[dict]]], desc: str,
                      prompt_version: str = "") -> set[str]:
        """Upload `requests` (key, item id, messages) as batch input files within the Batch API's limits and start
        a batch for each; each batch is recorded as soon as it exists."""
        sent, lines, size = set(), [], 0

        def flush() -> None:
            nonlocal lines, size
            if not lines:
                return
            data = "".join(line for line, *_ in lines).encode()
            try:
                upload = client.files.create(file=(f"{desc}.jsonl", data), purpose="batch")
                batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                              completion_window="24h", metadata={"phi1": desc})
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise AuthError(f"{self.model} at {self.base_url or 'OpenAI'}: {e.message}") from e
            except openai.APIError as e:
                raise LLMError(f"{self.model}: the Batch API refused a batch of {len(lines)} requests: {e}") from e
            worst = [self._worst_case(messages) for *_, messages in lines]
            with self._db:
                self._db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", (
                    batch.id, batch.status, len(lines), sum(p + c for p, c in worst),
                    sum(self.cost(p, c) for p, c in worst)))
                self._db.executemany("INSERT OR REPLACE INTO batch_requests VALUES (?, ?, ?)",
                                     [(key, batch.id, item_id) for _, key, item_id, _ in lines])
                self._db.executemany("INSERT OR REPLACE INTO capless VALUES (?, ?)",
                                     [(key, self.key(messages, prompt_version, capped=False))
                                      for _, key, _, messages in lines])
            self.stats.requests += len(lines)
            log.info("%s: batch %s sent (%d requests)", desc, batch.id, len(lines))
            sent.add(batch.id)
            lines, size = [], 0

        for key, item_id, messages in requests:
            line = json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": self.model, "messages": messages, **self.params}}) + "\n"
            if len(lines) == BATCH_MAX_REQUESTS or size + len(line.encode()) > BATCH_MAX_BYTES:
                flush()
            lines.append((line, key, item_id, messages))
            size += len(line.encode())
        flush()
        return sent

    def _wait_for_batches(self, client: openai.OpenAI, batch_ids: list[str], desc: str) -> None:
        """Poll the batches until each is done, collecting each as it finishes; raise BatchPending when
        `batch_wait_s` runs out first."""
        if not batch_ids:
            return
        sizes = dict(self._db.execute(f"SELECT id, requests FROM batches WHERE id IN ({','.join('?' * len(batch_ids))})",
                                      batch_ids).fetchall())
        bar = tqdm(total=sum(sizes.values()), desc=f"{desc} (batch)", unit="req", dynamic_ncols=True)
        deadline = None if self.batch_wait_s is None else time.monotonic() + self.batch_wait_s
        collected, pending = 0, list(batch_ids)
        try:
            while True:
                progress, still = collected, []
                for batch_id in pending:
                    try:
                        batch = client.batches.retrieve(batch_id)
                    except (openai.APIConnectionError, openai.InternalServerError) as e:
                        # A wait lasts up to 24 h: an outage longer than the SDK's retries is waited out too.
                        log.warning("%s: batch %s: %s; asking again in %.0f s", desc, batch_id, e, self.batch_poll_s)
                        still.append(batch_id)
                        continue
                    if batch.status in BATCH_DONE:
                        self._collect(client, batch, desc)
                        collected += sizes[batch_id]
                        progress += sizes[batch_id]
                    else:
                        counts = batch.request_counts
                        progress += (counts.completed + counts.failed) if counts else 0
                        still.append(batch_id)
                bar.n = progress
                bar.set_postfix_str(f"{len(still)} batch(es) open, ${self.stats.dollars:.4f}")
                bar.refresh()
                pending = still
                if not pending:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise BatchPending(
                        f"{len(pending)} batch(es) still being processed by OpenAI ({', '.join(pending[:3])}"
                        f"{', ...' if len(pending) > 3 else ''}; up to 24 h): run the same command again to collect"
                        " them (nothing is sent twice)")
                time.sleep(self.batch_poll_s)
        finally:
            bar.close()

    def _collect(self, client: openai.OpenAI, batch, desc: str) -> None:
        """Cache the answers of a finished batch and quarantine its failed requests; the requests it did not
        answer (an expired or cancelled batch) are sent again by the next run."""
        items = dict(self._db.execute("SELECT key, item FROM batch_requests WHERE batch = ?", (batch.id,)).fetchall())
        answered = 0
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            # A full batch's output is ~50,000 answers (~200 MB of textbooks): read as one text, parsed a line at a
            # time, committed once. Lines end at \n only: the answers in them are UTF-8, and str.splitlines would
            # also split one at a U+2028, U+0085 or form feed (the batch then never collected).
            text = client.files.content(file_id).text
            with self._db:
                for line in text.split("\n"):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    key, response = row.get("custom_id"), row.get("response") or {}
                    body = response.get("body") or {}
                    if response.get("status_code") == 200 and body.get("choices"):
                        usage = body.get("usage") or {}
                        choice = body["choices"][0]
                        answer = {"text": choice["message"].get("content") or "",
                                  "prompt_tokens": usage.get("prompt_tokens", 0),
                                  "completion_tokens": usage.get("completion_tokens", 0),
                                  "finish_reason": choice.get("finish_reason")}
                        self.stats.prompt_tokens += answer["prompt_tokens"]
                        self.stats.completion_tokens += answer["completion_tokens"]
                        self.stats.dollars += self.cost(answer["prompt_tokens"], answer["completion_tokens"])
                        self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(answer)))
                        answered += 1
                    else:
                        error = row.get("error") or body.get("error") or {}
                        self.stats.failed += 1
                        self._quarantine(items.get(key, key), f"batch {batch.id}: HTTP {response.get('status_code')}:"
                                         f" {error.get('message', error)}", None)
        with self._db:
            self._db.execute("UPDATE batches SET status = ? WHERE id = ?", (batch.status, batch.id))
        if batch.status == "failed":  # the input was refused as a whole (a model name, a malformed line)
            errors = "; ".join(e.message or "" for e in (batch.errors.data or [])) if batch.errors else ""
            raise LLMError(f"{self.model}: batch {batch.id} failed: {errors or 'no reason given'}")
        if answered < len(items):
            log.warning("%s: batch %s %s with %d of its %d requests answered; the rest are sent again by the next"
                        " run", desc, batch.id, batch.status, answered, len(items))

    def summary(self) -> dict:
        return asdict(self.stats)


def _retry_after(error: openai.APIStatusError) -> float | None:
    value = error.response.headers.get("retry-after") if error.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
