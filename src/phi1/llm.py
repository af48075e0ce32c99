"""The LLM client every stage that calls a model goes through (annotation, synthetic data, grading).

The official `openai` client with a configurable `base_url` (OpenAI, Azure OpenAI's v1 endpoint, vLLM, TGI,
any OpenAI-compatible server), used asynchronously with a bound on requests in flight, and around it:
- retries with exponential backoff that honour `Retry-After`; the SDK's own retries are off
  (`max_retries=0`), so ours are the only ones and are counted; `insufficient_quota` and authentication
  errors stop the run at once (retrying cannot help);
- a persistent SQLite cache keyed by model, the full messages, the sampling parameters and the prompt
  version: a rerun or a resumed run never pays twice for the same request;
- a budget in tokens and dollars, counted from each response's `usage` and checked before each request
  against what is spent plus the worst case of what is in flight, so that it is never exceeded;
- `estimate()`, a dry run that prices a stage before anything is sent;
- a progress bar with requests/s, tokens/s and dollars; answers that fail or do not parse are written to a
  quarantine file with the reason, never guessed.
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

from phi1.errors import Phi1Error

log = logging.getLogger(__name__)

# ~4 characters per token for English and code with OpenAI's tokenizers: the rule of thumb OpenAI gives,
# good enough to price a stage before running it and to reserve budget for a request in flight.
CHARS_PER_TOKEN = 4


class LLMError(Phi1Error, RuntimeError):
    pass


class QuotaExceeded(LLMError):
    pass


class BudgetExceeded(LLMError):
    pass


class AuthError(LLMError):
    pass


class ParseError(ValueError):
    """Raised by a stage's parser when an answer does not have the expected form."""


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
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self):
        self.params = dict(self.params)
        Path(self.cache_path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.cache_path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)")
        self._reserved_tokens = 0
        self._reserved_dollars = 0.0

    @classmethod
    def from_config(cls, c, cache_path, quarantine_path) -> LLM:
        """From an `llm` config group entry (conf/llm/*.yaml); every stage that calls a model builds it here."""
        return cls(model=c.model, base_url=c.base_url, api_key_env=c.api_key_env, concurrency=c.concurrency,
                   max_retries=c.max_retries, timeout=c.timeout,
                   params={"temperature": c.temperature, "max_tokens": c.max_tokens},
                   price_input=c.price_input, price_output=c.price_output, budget_usd=c.budget_usd,
                   budget_tokens=c.budget_tokens, cache_path=str(cache_path), quarantine_path=str(quarantine_path))

    # -- pricing and budget ------------------------------------------------------------------------------

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input + completion_tokens * self.price_output) / 1e6

    def _worst_case(self, messages: list[dict]) -> tuple[int, int]:
        prompt = sum(len(m["content"]) for m in messages) // CHARS_PER_TOKEN + 1
        return prompt, int(self.params.get("max_tokens") or 4096)

    def estimate(self, requests: list[list[dict]], output_tokens: int | None = None, prompt_version: str = "") -> dict:
        """Dry run: tokens and dollars for these requests, nothing sent. Cached ones cost nothing; without
        `output_tokens`, every answer is priced at max_tokens (the worst case)."""
        uncached = [m for m in requests if self._cached(self.key(m, prompt_version)) is None]
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

    def key(self, messages: list[dict], prompt_version: str = "") -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "params": self.params,
                           "prompt_version": prompt_version}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cached(self, key: str) -> dict | None:
        row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def cached_response(self, messages: list[dict], prompt_version: str = "") -> dict | None:
        """{"text", "prompt_tokens", "completion_tokens"} of an answer already received, else None."""
        return self._cached(self.key(messages, prompt_version))

    def _store(self, key: str, response: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(response)))
        self._db.commit()  # at once: a run killed a moment later has still paid for this one only once

    def _quarantine(self, item_id: str, reason: str, text: str | None) -> None:
        self.stats.quarantined += 1
        with open(self.quarantine_path, "a") as f:
            f.write(json.dumps({"id": item_id, "reason": reason, "answer": text, "model": self.model}) + "\n")

    # -- requests -------------------------------------------------------------------------------------------

    def _client(self) -> openai.AsyncOpenAI:
        api_key = os.environ.get(self.api_key_env) or ("unused" if self.base_url else None)
        if api_key is None:
            raise AuthError(f"no API key: set {self.api_key_env} (or point base_url at a server that needs none)")
        return openai.AsyncOpenAI(api_key=api_key, base_url=self.base_url, max_retries=0, timeout=self.timeout)

    async def _request(self, client: openai.AsyncOpenAI, messages: list[dict]) -> dict:
        for attempt in range(self.max_retries + 1):
            try:
                self.stats.requests += 1
                response = await client.chat.completions.create(model=self.model, messages=messages, **self.params)
                usage = response.usage
                return {"text": response.choices[0].message.content or "",
                        "prompt_tokens": usage.prompt_tokens if usage else 0,
                        "completion_tokens": usage.completion_tokens if usage else 0}
            except openai.RateLimitError as e:
                if getattr(e, "code", None) == "insufficient_quota":
                    raise QuotaExceeded(f"{self.model}: insufficient quota ({e.message}); nothing more is sent") from e
                wait = _retry_after(e) or self._backoff(attempt)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise AuthError(f"{self.model} at {self.base_url or 'OpenAI'}: {e.message}") from e
            except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError) as e:
                wait = self._backoff(attempt)
                log.debug("retrying after %s", type(e).__name__)
            except openai.APIStatusError as e:
                if e.status_code >= 500 or e.status_code == 408:
                    wait = self._backoff(attempt)
                else:
                    raise LLMError(f"{self.model}: HTTP {e.status_code}: {e.message}") from e
            if attempt == self.max_retries:
                break
            self.stats.retries += 1
            await asyncio.sleep(wait)
        raise LLMError(f"{self.model}: no answer after {self.max_retries + 1} attempts")

    def _backoff(self, attempt: int) -> float:
        # 1, 2, 4, ... s with ±25% jitter so that many clients do not retry in step
        return min(self.max_backoff, 2**attempt) * random.uniform(0.75, 1.25)

    def map(self, items: list[tuple[str, list[dict]]], parse: Callable[[str], Any], prompt_version: str = "",
            desc: str = "llm") -> dict[str, Any]:
        """Ask every (id, messages); return {id: parse(answer)} for the answers that parse. Failures and
        unparseable answers go to the quarantine file. Stops (raising) on quota, auth or budget errors,
        after the answers already received are cached."""
        return asyncio.run(self._map(items, parse, prompt_version, desc))

    async def _map(self, items, parse, prompt_version, desc) -> dict[str, Any]:
        results: dict[str, Any] = {}
        gate = asyncio.Semaphore(self.concurrency)
        client = self._client()
        t0 = time.perf_counter()
        bar = tqdm(total=len(items), desc=desc, unit="req", dynamic_ncols=True)
        stop: list[BaseException] = []

        async def one(item_id: str, messages: list[dict]) -> None:
            key = self.key(messages, prompt_version)
            response = self._cached(key)
            if response is not None:
                self.stats.cached += 1
            else:
                async with gate:
                    if stop:
                        return
                    try:
                        tokens, dollars = self._reserve(messages)
                    except BudgetExceeded as e:
                        stop.append(e)
                        return
                    try:
                        response = await self._request(client, messages)
                    except (QuotaExceeded, AuthError) as e:
                        stop.append(e)
                        return
                    except LLMError as e:
                        self.stats.failed += 1
                        self._quarantine(item_id, str(e), None)
                        return
                    finally:
                        self._reserved_tokens -= tokens
                        self._reserved_dollars -= dollars
                    s = self.stats
                    s.prompt_tokens += response["prompt_tokens"]
                    s.completion_tokens += response["completion_tokens"]
                    s.dollars += self.cost(response["prompt_tokens"], response["completion_tokens"])
                    self._store(key, response)
            try:
                results[item_id] = parse(response["text"])
            except ParseError as e:
                self._quarantine(item_id, f"unparseable: {e}", response["text"])
            bar.update(1)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            s = self.stats
            bar.set_postfix_str(f"{s.requests / elapsed:.1f} req/s, "
                                f"{(s.prompt_tokens + s.completion_tokens) / elapsed:,.0f} tok/s, ${s.dollars:.4f}")

        try:
            await asyncio.gather(*(one(i, m) for i, m in items))
        finally:
            bar.close()
            await client.close()
        if stop:
            raise stop[0]
        return results

    def summary(self) -> dict:
        return asdict(self.stats)


def _retry_after(error: openai.APIStatusError) -> float | None:
    value = error.response.headers.get("retry-after") if error.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
