"""The LLM client against a loopback OpenAI-compatible server that injects the real API's faults; requests
are counted at the server."""

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from openai_server import FakeOpenAI
from phi1.llm import LLM, AuthError, BatchPending, BudgetExceeded, LLMError, ParseError, QuotaExceeded


def grade(text: str) -> int:
    m = re.search(r"(\d+)/10", text)
    if not m:
        raise ParseError("no 'N/10' grade")
    return int(m.group(1))


def ask(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture
def server():
    with FakeOpenAI() as s:
        yield s


@pytest.fixture
def make_llm(server, tmp_path):
    def make(**kw):
        defaults = dict(model="gpt-test", base_url=server.base_url, concurrency=4, max_retries=3, timeout=1.0,
                        max_backoff=0.2, cache_path=str(tmp_path / "cache.sqlite"),
                        quarantine_path=str(tmp_path / "quarantine.jsonl"), price_input=10.0, price_output=30.0)
        return LLM(**{**defaults, **kw})

    return make


def test_answers_are_parsed_and_cached_across_runs(make_llm, server):
    items = [(f"doc{i}", ask(f"snippet {i}")) for i in range(10)]
    first = make_llm().map(items, grade)
    assert first == {f"doc{i}": 7 for i in range(10)} and server.count() == 10
    again = make_llm()  # a new process would open the same cache file
    assert again.map(items, grade) == first
    assert server.count() == 10 and again.stats.cached == 10  # nothing paid twice
    make_llm(params={"temperature": 0.7, "max_tokens": 512}).map(items[:2], grade)
    assert server.count() == 12  # other sampling parameters: another cache key


def test_the_cache_uses_wal_on_a_local_disk_and_the_rollback_journal_where_several_hosts_mount_it(
        make_llm, server, tmp_path, monkeypatch):
    """WAL's index is shared memory, which processes on other hosts do not share: Slurm jobs on several nodes
    writing one cache on NFS corrupt it (sqlite.org/wal.html). The file system is read from the mount table."""
    import phi1.llm
    from phi1.llm import filesystem

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/export {tmp_path}/shared\\040disk nfs4 rw 0 0\n")
    assert filesystem(tmp_path / "shared disk" / "data" / "llm_cache.sqlite", str(mounts)) == "nfs4"
    assert filesystem(tmp_path / "shared" / "x", str(mounts)) == "ext4"  # a neighbour of the mount point, not in it
    assert filesystem(tmp_path, str(tmp_path / "gone")) == ""  # no mount table: not Linux
    mode = lambda llm: llm._db.execute("PRAGMA journal_mode").fetchone()[0]  # noqa: E731
    assert mode(make_llm()) == "wal"
    monkeypatch.setattr(phi1.llm, "filesystem", lambda path: "nfs4")
    nfs = make_llm(cache_path=str(tmp_path / "nfs.sqlite"))
    assert mode(nfs) == "delete" and nfs.map([("a", ask("x"))], grade) == {"a": 7}
    assert make_llm(cache_path=str(tmp_path / "nfs.sqlite")).map([("a", ask("x"))], grade) == {"a": 7}
    assert server.count() == 1  # cached there as here


def test_an_answer_waits_for_another_processs_long_write_to_the_cache(make_llm, server, tmp_path):
    """Another stage writing into the shared cache for longer than sqlite3's default wait of 5 s (a full batch's
    ~50,000 answers in one transaction): the answer received meanwhile is stored once the write ends, not lost
    to "database is locked"."""
    llm = make_llm()
    other = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1]); db.execute('BEGIN IMMEDIATE');"
        " db.execute(\"INSERT INTO responses VALUES ('other', '{}')\"); print('locked', flush=True);"
        " time.sleep(6); db.commit()"), str(tmp_path / "cache.sqlite")], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "locked"
    t0 = time.monotonic()
    assert llm.map([("a", ask("snippet a"))], grade) == {"a": 7}
    assert time.monotonic() - t0 > 4  # it waited for the other write
    assert other.wait(timeout=30) == 0
    assert make_llm().map([("a", ask("snippet a"))], grade) == {"a": 7} and server.count() == 1  # stored


def test_the_same_request_in_flight_twice_is_sent_once(make_llm, server):
    # Two documents of the same text (an annotation sample, a corpus with copies): the second waits for the
    # first's answer instead of paying for its own.
    items = [("a", ask("same text [slow]")), ("b", ask("same text [slow]")), ("c", ask("other [slow]"))]
    llm = make_llm(concurrency=4)
    assert llm.map(items, grade) == {"a": 7, "b": 7, "c": 7}
    assert server.count() == 2 and llm.stats.cached == 1 and server.max_in_flight == 2


def test_requests_in_flight_are_bounded(make_llm, server):
    make_llm(concurrency=3).map([(f"d{i}", ask(f"doc {i} [slow]")) for i in range(12)], grade)
    assert server.max_in_flight == 3  # as many as allowed, never more


def test_a_long_run_holds_as_many_tasks_as_requests_in_flight_and_logs_a_few_progress_lines(make_llm, server,
                                                                                               capfd):
    """One task per request up front held 1.09 GB at the paper's ~1M textbooks; a redraw forced per answer wrote
    one progress line per request into a batch job's log."""
    import asyncio

    items = [(f"d{i}", ask(f"doc {i}")) for i in range(400)]
    make_llm(concurrency=3).map(items, grade)  # answered by the server, then cached
    capfd.readouterr()
    tasks = []

    def count_tasks(text: str) -> int:
        tasks.append(len(asyncio.all_tasks()))
        return grade(text)

    assert make_llm(concurrency=3).map(items, count_tasks, desc="again") == {i: 7 for i, _ in items}
    assert max(tasks) == 1 + 3  # the loop's main task and the three workers, not one per request
    redraws = capfd.readouterr().err.count("again:")
    assert 1 <= redraws < 40, redraws  # at most one per 0.1 s, not 400


def test_requests_are_not_logged_one_line_each(make_llm, caplog):
    """Under Hydra (root logger at INFO) openai's HTTP client logged "HTTP Request: POST ..." per request."""
    caplog.set_level("INFO")
    make_llm().map([(f"d{i}", ask(f"doc {i}")) for i in range(5)], grade)
    assert not [r for r in caplog.records if "HTTP Request" in r.getMessage()], caplog.text[-500:]


def test_prompt_version_is_part_of_the_cache_key(make_llm, server):
    llm = make_llm()
    llm.map([("a", ask("x"))], grade, prompt_version="v1")
    llm.map([("a", ask("x"))], grade, prompt_version="v2")
    assert server.count() == 2


@pytest.mark.parametrize("batch", [False, True], ids=["requests", "batch"])
def test_raising_max_tokens_pays_only_for_the_answers_the_cap_cut(make_llm, server, batch):
    """An answer that ended on its own within max_tokens is the answer under a larger cap too: raising
    llm.max_tokens to keep the textbooks the cap cut sent every request again, under a key of its own."""
    server.reply = lambda messages: "x" * int(messages[-1]["content"].split()[-1])  # 1 token per 4 characters
    items = [(f"d{i}", ask(f"write {40 * i}")) for i in range(1, 9)]  # answers of 11, 21, ..., 81 tokens
    make = lambda cap: make_llm(params={"temperature": 1.0, "max_tokens": cap}, batch=batch, batch_poll_s=0.05)
    first = make(50).map(items, len)
    assert server.count() == 8 and [first[f"d{i}"] for i in range(1, 9)] == [40, 80, 120, 160, 200, 200, 200, 200]
    assert make(100).estimate([m for _, m in items])["cached"] == 4
    raised = make(100)
    assert raised.map(items, len) == {f"d{i}": 40 * i for i in range(1, 9)}
    assert server.count() == 12 and raised.stats.cached == 4  # the four cut at 50 tokens, sent again
    again = [r["body"]["messages"][-1]["content"] for r in server.requests[8:]]
    assert sorted(again) == [f"write {40 * i}" for i in (5, 6, 7, 8)]
    assert raised.cached_response(items[0][1])["finish_reason"] == "stop"
    # Lowered: an answer longer than the new cap would have been cut there, so it is asked again.
    lowered = make(25)
    assert lowered.map(items[:3], len) == {"d1": 40, "d2": 80, "d3": 100} and server.count() == 13
    assert make(25).map(items[:3], len) == {"d1": 40, "d2": 80, "d3": 100} and server.count() == 13


def test_rate_limits_honour_retry_after_and_are_counted(make_llm, server):
    llm = make_llm()
    t0 = time.perf_counter()
    assert llm.map([("a", ask("snippet [429:2]"))], grade) == {"a": 7}
    assert time.perf_counter() - t0 >= 2.0  # two waits of Retry-After: 1 s, not the 0.2 s backoff
    assert server.count("429") == 2 and server.count("200") == 1
    assert llm.stats.retries == 2 and llm.stats.requests == 3  # the SDK's own retries are off: no stacking


def test_server_errors_and_timeouts_are_retried_a_bounded_number_of_times(make_llm, server):
    llm = make_llm()
    assert llm.map([("a", ask("[500:2]")), ("b", ask("[timeout:1]"))], grade) == {"a": 7, "b": 7}
    assert server.count("500") == 2 and server.count("timeout") == 1
    hopeless = make_llm(max_retries=2)
    with pytest.raises(LLMError, match="the one request got no answer"):  # nothing answered: not a finished stage
        hopeless.map([("c", ask("[500:99]"))], grade)
    assert server.count("500") == 2 + 3  # 1 try + 2 retries, then it gives up
    quarantine = [json.loads(line) for line in open(hopeless.quarantine_path)]
    assert quarantine[-1]["id"] == "c" and "no answer after 3 attempts" in quarantine[-1]["reason"]


def test_insufficient_quota_stops_at_once(make_llm, server):
    items = [("q", ask("[quota]"))] + [(f"d{i}", ask(f"doc {i}")) for i in range(20)]
    with pytest.raises(QuotaExceeded, match="insufficient quota"):
        make_llm(concurrency=1).map(items, grade)
    assert server.count("429") == 1  # never retried
    assert server.count() < len(items)  # and the rest was not sent


def test_authentication_errors_stop_at_once(make_llm, server):
    with pytest.raises(AuthError):
        make_llm().map([("a", ask("[auth]"))], grade)
    assert server.count() == 1


def test_empty_and_malformed_answers_are_quarantined_with_the_reason(make_llm, server):
    llm = make_llm()
    out = llm.map([("ok", ask("fine")), ("e", ask("[empty]")), ("m", ask("[malformed]"))], grade)
    assert out == {"ok": 7}
    rows = {r["id"]: r for r in map(json.loads, open(llm.quarantine_path))}
    assert set(rows) == {"e", "m"} and rows["m"]["answer"] == "I cannot grade this."
    assert all("unparseable" in r["reason"] for r in rows.values())
    again = make_llm()  # a rerun: the cached answers fail to parse again, and are not written twice
    assert again.map([("ok", ask("fine")), ("e", ask("[empty]")), ("m", ask("[malformed]"))], grade) == out
    assert again.stats.quarantined == 2 and len(open(llm.quarantine_path).readlines()) == 2
    # An answer cut at max_tokens before its grade: the reason says which setting to raise.
    cut = make_llm(params={"temperature": 0.0, "max_tokens": 5}, quarantine_path=str(llm.quarantine_path) + ".cut")
    assert cut.map([("c", ask("fine"))], grade) == {}
    (row,) = map(json.loads, open(cut.quarantine_path))
    assert row["answer"] == "A short evaluation. " and row["reason"].endswith(
        "(the answer was cut at max_tokens=5: raise llm.max_tokens)")


def test_budget_stops_before_it_is_exceeded(make_llm, server):
    # Each request is reserved at its worst case (prompt + max_tokens=100) × $10/$30 per M tokens ≈ $0.0031.
    llm = make_llm(budget_usd=0.01, params={"temperature": 0.0, "max_tokens": 100}, concurrency=1)
    items = [(f"d{i}", ask(f"document number {i}")) for i in range(20)]
    with pytest.raises(BudgetExceeded):
        llm.map(items, grade)
    assert llm.stats.dollars <= 0.01
    assert 0 < server.count() < 20
    tokens = make_llm(budget_tokens=300, params={"temperature": 0.0, "max_tokens": 100}, concurrency=1,
                      cache_path=llm.cache_path + ".2")
    with pytest.raises(BudgetExceeded, match="token budget"):
        tokens.map(items, grade)
    assert tokens.stats.prompt_tokens + tokens.stats.completion_tokens <= 300


def test_a_killed_run_resumed_sends_only_the_missing_requests(make_llm, server, tmp_path):
    items = [(f"d{i}", ask(f"document {i} [slow]")) for i in range(20)]
    script = (
        "import re, sys\n"
        "from phi1.llm import LLM\n"
        f"llm = LLM(model='gpt-test', base_url='{server.base_url}', concurrency=2, cache_path='{tmp_path}/cache.sqlite',"
        f" quarantine_path='{tmp_path}/q.jsonl')\n"
        f"llm.map({items!r}, lambda t: t)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while server.count() < 8 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sent_before = server.count()
    cached = sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert 0 < cached < 20
    resumed = make_llm(concurrency=2, params={"temperature": 0.0, "max_tokens": 512})
    assert len(resumed.map(items, grade)) == 20
    assert server.count() - sent_before == 20 - cached  # only what the killed run never got back
    assert resumed.stats.cached == cached


def test_dry_run_prices_without_sending(make_llm, server):
    llm = make_llm(params={"temperature": 0.0, "max_tokens": 100})
    est = llm.estimate([ask("x" * 400)] * 10, output_tokens=50)
    assert est["prompt_tokens"] == 10 * 101 and est["completion_tokens"] == 500
    assert est["dollars"] == pytest.approx((1010 * 10 + 500 * 30) / 1e6, abs=1e-4)
    assert server.count() == 0


def test_no_api_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm = LLM(model="gpt-4", cache_path=str(tmp_path / "c.sqlite"), quarantine_path=str(tmp_path / "q.jsonl"))
    with pytest.raises(AuthError, match="OPENAI_API_KEY"):
        llm.map([("a", ask("x"))], grade)


def test_batch_api_answers_at_half_price_and_a_rerun_collects_what_was_sent(make_llm, server, monkeypatch):
    """`batch=True`: the requests go to OpenAI's Batch API in input files within its limits (here 4 requests a
    file); a run that stops waiting leaves the batches recorded, and the next run collects them without
    sending anything again. Failed and unparseable answers are quarantined; failed ones are sent again."""
    import phi1.llm

    monkeypatch.setattr(phi1.llm, "BATCH_MAX_REQUESTS", 4)
    items = [(f"d{i}", ask(f"snippet {i}")) for i in range(8)] + [("bad", ask("[500:1]")), ("m", ask("[malformed]"))]
    batched = dict(batch=True, batch_poll_s=0.05, batch_wait_s=0.3)
    server.hold_batches = True
    with pytest.raises(BatchPending, match=r"3 batch\(es\) still being processed .*run the same command again"):
        make_llm(**batched).map(items, grade)
    assert len(server.batches) == 3 and server.count() == 0  # sent, not yet processed
    assert [len(b["lines"]) for b in server.batches.values()] == [4, 4, 2]
    first = next(iter(server.batches.values()))["lines"][0]
    assert first["url"] == "/v1/chat/completions" and first["body"]["model"] == "gpt-test"
    with pytest.raises(LLMError, match=r"10 of these requests are in Batch API batches still open .*llm.batch=true"):
        make_llm().map(items, grade)  # one at a time, they would be paid twice
    assert server.count() == 0

    server.hold_batches = False
    llm = make_llm(**batched)
    assert llm.map(items, grade) == {f"d{i}": 7 for i in range(8)}
    assert len(server.batches) == 3 and server.count() == 10  # collected, nothing sent twice
    answers = [r for r in server.requests if r["outcome"] == "200"]
    prompt = sum(sum(len(m["content"]) for m in r["body"]["messages"]) // 4 + 1 for r in answers)
    completion = sum(len(t) // 4 + 1 for t in ["A short evaluation. Educational value: 7/10. Label: high"] * 8
                     + ["I cannot grade this."])
    assert llm.stats.dollars == pytest.approx((prompt * 10.0 + completion * 30.0) / 1e6 / 2)  # half the list price
    rows = {r["id"]: r for r in map(json.loads, open(llm.quarantine_path))}
    assert set(rows) == {"bad", "m"} and "HTTP 500" in rows["bad"]["reason"] and "unparseable" in rows["m"]["reason"]

    again = make_llm(**batched)
    assert again.map(items, grade) == {**{f"d{i}": 7 for i in range(8)}, "bad": 7}
    assert len(server.batches) == 4 and len(list(server.batches.values())[-1]["lines"]) == 1  # the failed one
    assert again.stats.cached == 9


def test_a_batch_answer_with_a_unicode_line_separator_is_collected_whole(make_llm, server):
    """A batch's output file is JSON lines split at \\n; str.splitlines also split inside an answer at U+2028,
    U+0085 or a form feed, and the unparseable half-line stopped every collection of that batch (paid for)."""
    text = "Evaluation:\u2028clear.\x85\x0c Educational value: 7/10."
    server.reply = lambda messages: text
    llm = make_llm(batch=True, batch_poll_s=0.05)
    assert llm.map([("x", ask("snippet"))], grade) == {"x": 7}
    assert llm.cached_response(ask("snippet"))["text"] == text


def test_a_batch_is_waited_for_through_an_outage(make_llm, server):
    server.status_failures = 3  # three status reads in a row fail (and the SDK does not retry them here)
    llm = make_llm(batch=True, batch_poll_s=0.05, max_retries=0)
    assert llm.map([(f"d{i}", ask(f"doc {i}")) for i in range(3)], grade) == {f"d{i}": 7 for i in range(3)}
    assert server.status_failures == 0 and len(server.batches) == 1


def test_batch_api_sends_what_the_budget_allows(make_llm, server):
    # Worst case per request: (prompt ~5 + max_tokens 100 tokens) at $10/$30 per M, halved ≈ $0.0015.
    batched = dict(batch=True, batch_poll_s=0.05, params={"temperature": 0.0, "max_tokens": 100})
    llm = make_llm(budget_usd=0.005, **batched)
    items = [(f"d{i}", ask(f"document number {i}")) for i in range(20)]
    with pytest.raises(BudgetExceeded, match=r"17 of 20 requests were not sent"):
        llm.map(items, grade)
    assert server.count() == 3 and llm.stats.dollars <= 0.005
    assert len(make_llm(**batched).map(items, grade)) == 20  # the rest, on a larger budget
    assert server.count() == 20


def test_an_unreachable_server_stops_the_run_instead_of_retrying_every_request(make_llm, tmp_path):
    """A mistyped base_url: each request retried to the end and quarantined, one after another (at the defaults
    ~1 min each: days for a 100K-request annotation), and the stage ended "done" with nothing. As many requests
    in a row without an answer as are sent at once stop the run, naming the error."""
    import socket

    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The quarantine in a folder not made yet (a stage's output at its first run): the first failure wrote to it
    # and stopped the run with a FileNotFoundError instead of this error.
    quarantine = tmp_path / "synthetic" / "exercises" / "quarantine.jsonl"
    llm = make_llm(base_url=f"http://127.0.0.1:{port}/v1", concurrency=2, max_retries=2,
                   quarantine_path=str(quarantine))
    items = [(f"d{i}", ask(f"doc {i}")) for i in range(40)]
    with pytest.raises(LLMError, match=r"2 requests in a row got no answer \(the last: gpt-test: no answer after 3 "
                                       r"attempts \(the last: APIConnectionError: .*llm.base_url and llm.model right"):
        llm.map(items, grade)
    # One that started as the first failed is given up at its next retry; the rest are never sent.
    assert 2 <= llm.stats.failed <= 3 and llm.stats.requests <= 3 * llm.stats.failed + 2
    assert len(quarantine.read_text().splitlines()) == llm.stats.failed
    # Fewer requests than are sent at once (a trial with stage.n=4 at concurrency 8) never made "in a row": every
    # one failed and the stage wrote its empty outputs as if done.
    few = make_llm(base_url=f"http://127.0.0.1:{port}/v1", concurrency=8, max_retries=1)
    with pytest.raises(LLMError, match=r"gpt-test at http://127.0.0.1:\d+/v1: all 3 requests got no answer \(the last"):
        few.map(items[:3], grade)


def test_a_request_the_server_cannot_answer_does_not_stop_the_others(make_llm, server):
    # One hopeless request between answered ones: quarantined, and the run goes on (the count resets).
    items = [("bad1", ask("[500:99]")), ("ok1", ask("fine")), ("bad2", ask("[500:99] again")), ("ok2", ask("fine 2"))]
    assert make_llm(concurrency=1, max_retries=1).map(items, grade) == {"ok1": 7, "ok2": 7}


def test_a_server_without_a_model_name_is_refused_before_any_request(tmp_path):
    """llm=openai_compatible leaves the model to the user; without one every request was sent unnamed and retried."""
    from omegaconf import OmegaConf

    from phi1.config import ConfigError, LLMConfig

    c = OmegaConf.structured(LLMConfig(name="local", kind="openai", base_url="http://localhost:8000/v1"))
    with pytest.raises(LLMError, match=r"^llm.model: llm=local needs the name of the model to ask \(llm.model=<name>: "
                                       r"the one the server at http://localhost:8000/v1 serves\)"):
        LLM.from_config(c, cache_path=tmp_path / "c.sqlite", quarantine_path=tmp_path / "q.jsonl")
    c.model = "qwen"
    assert LLM.from_config(c, cache_path=tmp_path / "c.sqlite", quarantine_path=tmp_path / "q.jsonl").model == "qwen"
    c.concurrency = 0  # no workers: nothing sent, and the stage ended "done" with empty outputs
    with pytest.raises(ConfigError, match=r"^llm.concurrency: must be >= 1 \(requests in flight at once\)$"):
        LLM.from_config(c, cache_path=tmp_path / "c.sqlite", quarantine_path=tmp_path / "q.jsonl")
    c.concurrency, c.budget_usd = 8, 0.0
    with pytest.raises(ConfigError, match=r"^llm.budget_usd: must be > 0 \(null: no budget\)$"):
        LLM.from_config(c, cache_path=tmp_path / "c.sqlite", quarantine_path=tmp_path / "q.jsonl")
    c.budget_usd, c.price_output = None, -1.0  # a negative price made every request "free" to the budget
    with pytest.raises(ConfigError, match=r"^llm.price_output: must be >= 0"):
        LLM.from_config(c, cache_path=tmp_path / "c.sqlite", quarantine_path=tmp_path / "q.jsonl")
