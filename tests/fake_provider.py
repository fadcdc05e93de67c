"""A real HTTP server that speaks the OpenAI chat-completions API, scripted per prompt.

By default it streams an answer derived from the prompt ("Echo: <prompt>") a word per chunk.
A test scripts what the next calls for a prompt get, in order, with `script(prompt, *steps)`;
when the steps run out the default answer comes back. A step is a dict:

    {"chunks": ["Hel", "lo"], "delay": 0.1}   stream these pieces, `delay` seconds apart
    {"status": 429, "retry_after": 1}         an HTTP error (any status), optional Retry-After
    {"hang": 30}                              accept, send headers, then say nothing for 30 s
    {"malformed": True}                       a stream whose chunk is not JSON
    {"usage": False}                          stream without the usage chunk
    {"finish": None}                          the finish_reason sent (default "stop"; "length"
                                              when max_tokens cut the answer)
    {"storm": {"429": 0.3, "500": 0.2, "hang": 0.05}, "retry_after": 1, "hang_seconds": 20, ...}
                                              per call, at random: a 429 (with Retry-After), a 500,
                                              a hang, or else the rest of the step (e.g. chunks)

A prompt may also carry its default behaviour itself, for tests that run the provider in
another process: a first line `#fake {"chunks": 20, "delay": 0.1}` (chunks may be a count).
Every call is recorded in `calls`; `GET /_calls` answers {prompt: number of calls} (for tests
that run it in another process). `max_in_flight` (and `GET /_in_flight`) is the most calls it
answered at once, per model. Run it alone with `python -m tests.fake_provider PORT` (0 picks
a free port; the first line printed is its URL).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Call:
    prompt: str
    model: str
    max_tokens: int | None
    temperature: float | None
    body: dict
    outcome: str = ""
    chunks_sent: int = 0
    disconnected: bool = False
    started: float = field(default_factory=time.monotonic)


class FakeProvider:
    """The server and its script; `url` is the base URL to put in a model's catalog entry."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.scripts: dict[str, deque] = defaultdict(deque)
        self.calls: list[Call] = []
        # Streams being answered now, and the most at once, per upstream model name.
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.server = _Server((host, port), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-provider", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeProvider:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, prompt: str, *steps: dict) -> None:
        with self.lock:
            self.scripts[prompt].extend(steps)

    def reset(self) -> None:
        with self.lock:
            self.scripts.clear()
            self.calls.clear()
            self.in_flight.clear()
            self.max_in_flight.clear()

    def _streaming(self, model: str, delta: int) -> None:
        with self.lock:
            self.in_flight[model] += delta
            self.max_in_flight[model] = max(self.max_in_flight[model], self.in_flight[model])

    def calls_for(self, prompt: str) -> list[Call]:
        with self.lock:
            return [call for call in self.calls if call.prompt == prompt]

    def _next_step(self, prompt: str) -> dict:
        with self.lock:
            if self.scripts[prompt]:
                return self.scripts[prompt].popleft()
        first, _, rest = prompt.partition("\n")
        if first.startswith("#fake "):
            return json.loads(first[len("#fake ") :])
        return {}


class _Server(ThreadingHTTPServer):
    """A thread per connection, and a listen backlog for a thousand clients connecting at once."""

    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that went away (a kept-alive connection closed, a killed worker)
        super().handle_error(request, client_address)


def default_answer(prompt: str) -> list[str]:
    words = f"Echo: {prompt}".split(" ")
    return [word + " " for word in words[:-1]] + [words[-1]]


def _handler(provider: FakeProvider):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            if self.path == "/_in_flight":
                with provider.lock:
                    self._json(200, {"now": dict(provider.in_flight), "max": dict(provider.max_in_flight)})
            elif self.path == "/_calls":
                with provider.lock:
                    counts: dict[str, int] = {}
                    for call in provider.calls:
                        counts[call.prompt] = counts.get(call.prompt, 0) + 1
                self._json(200, counts)
            elif self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self):
            if self.path == "/_reset":
                provider.reset()
                return self._json(200, {})
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._json(400, {"error": {"message": "body is not JSON"}})
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            messages = body.get("messages") or [{}]
            prompt = messages[-1].get("content", "")
            call = Call(prompt, body.get("model", ""), body.get("max_tokens"), body.get("temperature"), body)
            with provider.lock:
                provider.calls.append(call)
            step = provider._next_step(prompt)
            provider._streaming(call.model, 1)
            try:
                self._respond(call, body, step)
            except (BrokenPipeError, ConnectionResetError):
                call.disconnected = True
                self.close_connection = True
            finally:
                provider._streaming(call.model, -1)

        def _respond(self, call: Call, body: dict, step: dict) -> None:
            if "storm" in step:
                step = _storm(step)
            if "status" in step:
                call.outcome = f"status {step['status']}"
                headers = {}
                if step.get("retry_after") is not None:
                    headers["Retry-After"] = str(step["retry_after"])
                message = step.get("message", f"scripted error {step['status']}")
                return self._json(step["status"], {"error": {"message": message, "type": "scripted"}}, headers)
            chunks = step.get("chunks")
            if isinstance(chunks, int):
                chunks = [f"word{i} " for i in range(chunks)]
            chunks = chunks or default_answer(call.prompt)
            # A piece is a token: an answer longer than max_tokens is cut there, as real servers do.
            max_tokens = body.get("max_tokens")
            finish = step.get("finish", "stop")
            if max_tokens and len(chunks) > max_tokens:
                chunks, finish = chunks[:max_tokens], "length"
            if not body.get("stream"):
                call.outcome = "complete"
                return self._json(200, _completion("".join(chunks), len(chunks)))
            # HTTP/1.1 with chunked transfer, the connection kept open for the next call, as
            # real providers do.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if "hang" in step:
                call.outcome = "hang"
                self.close_connection = True  # the client has given up by the time it ends
                self.wfile.flush()
                time.sleep(step["hang"])
                return
            if step.get("malformed"):
                call.outcome = "malformed"
                self._event(b"{not json")
                self._end()
                return
            delay = step.get("delay", 0)
            for piece in chunks:
                if delay:
                    time.sleep(delay)
                self._event(_piece_event(piece))
                call.chunks_sent += 1
            self._event(json.dumps(_chunk(None, finish=finish)).encode())
            if step.get("usage", True):
                usage = {"prompt_tokens": len(call.prompt.split()), "completion_tokens": len(chunks)}
                self._event(json.dumps({**_chunk(None), "usage": usage}).encode())
            self._event(b"[DONE]")
            self._end()
            call.outcome = "complete"

        def _event(self, data: bytes) -> None:
            """Send one server-sent event as one HTTP chunk (one write)."""
            event = b"data: " + data + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))

        def _end(self) -> None:
            self.wfile.write(b"0\r\n\r\n")

        def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _storm(step: dict) -> dict:
    """Draw this call's fate from a storm step's odds."""
    odds = step["storm"]
    roll = random.random()
    for fate in ("429", "500", "hang"):
        roll -= odds.get(fate, 0)
        if roll < 0:
            if fate == "hang":
                return {"hang": step.get("hang_seconds", 20)}
            return {"status": int(fate), "retry_after": step.get("retry_after") if fate == "429" else None}
    return {key: value for key, value in step.items() if key not in ("storm", "retry_after", "hang_seconds")}


_PIECE_EVENT = (
    '{"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": %d, "model": "fake", '
    '"choices": [{"index": 0, "delta": {"content": %s}, "finish_reason": null}]}'
)


def _piece_event(content: str) -> bytes:
    """The JSON of a chunk carrying `content`: `_chunk(content)` encoded, made cheaply (the bulk of a stream)."""
    return (_PIECE_EVENT % (int(time.time()), json.dumps(content))).encode()


def _chunk(content: str | None, finish: str | None = None) -> dict:
    delta = {"content": content} if content is not None else {}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if content is not None or finish else [],
    }


def _completion(text: str, tokens: int) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1},
    }


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
    fake = FakeProvider(port=port)
    print(f"fake provider at {fake.url}", flush=True)
    fake.server.serve_forever()
