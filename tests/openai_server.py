"""An OpenAI-compatible chat-completions server on loopback that injects the faults the real API shows.

A request's faults are written into its last message, so a test says exactly what happens to which request:
  [429:N]        the first N attempts get 429 with Retry-After: 1
  [quota]        429 insufficient_quota (every attempt)
  [auth]         401
  [500:N]        the first N attempts get 500
  [timeout:N]    the first N attempts hang for 3 s (longer than the client's timeout in the tests)
  [empty]        an empty answer
  [malformed]    an answer without the expected grade
  [slow]         the answer comes after 0.2 s
Otherwise the answer is `reply(messages)`, cut at the request's max_tokens (finish_reason "length"). Usage
counts 1 token per 4 characters. Every request that
reaches the server is recorded in `requests` (the body and the fault outcome), so tests count them.

The Batch API too: uploaded files (`uploads`), batches (`batches`, each with its input lines). A batch is
processed, request by request with the faults above, when its status is first read while `hold_batches` is
false; answers go to its output file, other outcomes to its error file (as OpenAI's). The next
`status_failures` status reads get a 500.
"""

from __future__ import annotations

import email.parser
import itertools
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def default_reply(messages: list[dict]) -> str:
    return "A short evaluation. Educational value: 7/10. Label: high"


class FakeOpenAI:
    def __init__(self, reply=default_reply):
        self.reply = reply
        self.requests: list[dict] = []
        self.attempts: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0
        self.uploads: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.hold_batches = False
        self.status_failures = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, payload, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if m := re.fullmatch(r"/v1/batches/([\w-]+)", self.path):
                    if server.status_failures > 0:  # an outage while a batch is waited for
                        server.status_failures -= 1
                        return self.reply(500, {"error": {"message": "The server had an error", "type": "server_error"}})
                    return self.reply(200, server._batch_status(m.group(1)))
                if m := re.fullmatch(r"/v1/files/([\w-]+)/content", self.path):
                    return self.reply(200, None, server.uploads[m.group(1)])
                self.reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.endswith("/files"):
                    return self.reply(200, server._upload(self.headers["Content-Type"], raw))
                if self.path.endswith("/batches"):
                    return self.reply(200, server._create_batch(json.loads(raw)))
                body = json.loads(raw)
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                status, headers, payload, delay = server._respond(body)
                if delay:
                    time.sleep(delay)
                with server._lock:
                    server.in_flight -= 1
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in {**headers, "Content-Type": "application/json",
                                 "Content-Length": str(len(data))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _upload(self, content_type: str, raw: bytes) -> dict:
        form = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        parts = {part.get_param("name", header="content-disposition"): part for part in form.get_payload()}
        file_id = f"file-{next(self._ids)}"
        self.uploads[file_id] = parts["file"].get_payload(decode=True)
        return {"id": file_id, "object": "file", "bytes": len(self.uploads[file_id]), "created_at": 0,
                "filename": parts["file"].get_filename(), "purpose": parts["purpose"].get_payload(), "status": "processed"}

    def _create_batch(self, body: dict) -> dict:
        lines = [json.loads(line) for line in self.uploads[body["input_file_id"]].decode().splitlines()]
        batch = {"id": f"batch-{next(self._ids)}", "object": "batch", "endpoint": body["endpoint"],
                 "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                 "created_at": 0, "status": "validating", "metadata": body.get("metadata"),
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        self.batches[batch["id"]] = {"lines": lines, "batch": batch}
        return batch

    def _batch_status(self, batch_id: str) -> dict:
        entry = self.batches[batch_id]
        batch = entry["batch"]
        if self.hold_batches or batch["status"] == "completed":
            if batch["status"] == "validating":
                batch["status"] = "in_progress"
            return batch
        out, err = [], []
        for line in entry["lines"]:
            status, _, payload, _ = self._respond(line["body"])
            row = {"id": f"req-{next(self._ids)}", "custom_id": line["custom_id"],
                   "response": {"status_code": status, "body": payload}, "error": None}
            # UTF-8 as the API writes it: a non-ASCII character of an answer is not escaped
            (out if status == 200 else err).append(json.dumps(row, ensure_ascii=False) + "\n")
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                batch[name] = f"file-{next(self._ids)}"
                self.uploads[batch[name]] = "".join(rows).encode()
        batch.update(status="completed", request_counts={"total": len(entry["lines"]), "completed": len(out),
                                                         "failed": len(err)})
        return batch

    def count(self, outcome: str | None = None) -> int:
        return sum(1 for r in self.requests if outcome is None or r["outcome"] == outcome)

    def _respond(self, body: dict):
        content = body["messages"][-1]["content"]
        key = json.dumps(body["messages"], sort_keys=True)
        with self._lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]

        def fault(name: str) -> bool:
            m = re.search(rf"\[{name}(?::(\d+))?\]", content)
            return bool(m) and (m.group(1) is None or attempt <= int(m.group(1)))

        def error(status, code, message, headers=None, delay=0.0):
            return status, headers or {}, {"error": {"message": message, "type": code, "code": code}}, delay

        if fault("quota"):
            outcome = error(429, "insufficient_quota", "You exceeded your current quota")
        elif fault("auth"):
            outcome = error(401, "invalid_api_key", "Incorrect API key provided")
        elif fault("429"):
            outcome = error(429, "rate_limit_exceeded", "Rate limit reached", {"Retry-After": "1"})
        elif fault("500"):
            outcome = error(500, "server_error", "The server had an error")
        elif fault("timeout"):
            outcome = (200, {}, self._completion(body, "late"), 3.0)
        else:
            text = "" if fault("empty") else "I cannot grade this." if fault("malformed") else self.reply(body["messages"])
            outcome = (200, {}, self._completion(body, text), 0.2 if fault("slow") else 0.0)
        with self._lock:
            self.requests.append({"body": body, "outcome": "timeout" if fault("timeout") else str(outcome[0])})
        return outcome

    @staticmethod
    def _completion(body: dict, text: str) -> dict:
        prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4 + 1
        finish = "stop"
        if body.get("max_tokens") and len(text) // 4 + 1 > body["max_tokens"]:  # cut there, as the API does
            text, finish = text[: 4 * body["max_tokens"]], "length"
        completion_tokens = len(text) // 4 + 1
        return {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
