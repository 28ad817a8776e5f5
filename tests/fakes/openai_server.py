"""A scriptable fake of the OpenAI chat-completions endpoint on a free loopback port.

Each request takes the next scripted action; with the script empty the server answers "by
keywords": the personas (from the prompt's persona block) whose names, or failing that whose
significant words, appear in the prompt's purchase block. That gives the stream tests a
deterministic, content-dependent labeler without a network.

    with FakeOpenAI() as fake:
        fake.script(fake.fail(500, times=2), fake.good(["Gardener"]))
        LLMConfig(base_url=fake.base_url, api_key="test", ...)
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from core.labelers.prompts import (
    CHARS_PER_TOKEN,
    PERSONAS_BEGIN,
    PERSONAS_END,
    PRODUCTS_BEGIN,
    PRODUCTS_END,
    read_block,
)

__all__ = ["Action", "FakeOpenAI", "keyword_personas"]

_WORD = re.compile(r"[a-z]{4,}")
_STOP = {"and", "with", "lover", "lovers", "enthusiast", "enthusiasts", "fans", "seeker", "aficionado",
         "collector", "items", "unique", "style"}


@dataclass(frozen=True)
class Action:
    """What to do with one request: optionally sleep, then a status (+headers) and reply text.

    `handler`, when set, computes the reply text from the decoded request body instead.
    """

    content: str | None = None
    status: int = 200
    sleep_s: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    handler: Callable[[dict[str, Any]], str] | None = None


def keyword_personas(prompt: str, max_personas: int = 5) -> list[str]:
    """Personas whose name (else whose significant words) occur in the prompt's purchase block."""
    try:
        personas = [row[0] for row in read_block(prompt, PERSONAS_BEGIN, PERSONAS_END)]
        products = " ".join(str(row[0]) for row in read_block(prompt, PRODUCTS_BEGIN, PRODUCTS_END))
    except (ValueError, IndexError, TypeError):
        return []
    text = products.casefold()
    found = [p for p in personas if p.casefold() in text]
    if not found:
        words = set(_WORD.findall(text))
        scored = [(sum(w in words for w in set(_WORD.findall(p.casefold())) - _STOP), i, p)
                  for i, p in enumerate(personas)]
        found = [p for s, _, p in sorted(scored, key=lambda t: (-t[0], t[1])) if s > 0]
    return (found or personas[:1])[:max_personas]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {}
        fake._enter(self.path, body, {k.lower(): v for k, v in self.headers.items()})
        try:
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                return
            action = fake._next_action()
            if action.sleep_s:
                time.sleep(action.sleep_s)
            if action.status != 200:
                err = {"error": {"message": f"fake status {action.status}", "type": "server_error"}}
                self._send(action.status, err, action.headers)
                return
            content = fake._content(action, body)
            self._send(200, _completion(body, content))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to answer
        finally:
            fake._leave()

    def _send(self, status: int, payload: dict[str, Any], headers: Iterable[tuple[str, str]] = ()) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def _completion(body: dict[str, Any], content: str) -> dict[str, Any]:
    prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    prompt_tokens = -(-prompt_chars // CHARS_PER_TOKEN)
    completion_tokens = -(-len(content) // CHARS_PER_TOKEN)
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI


@dataclass
class FakeOpenAI:
    """The fake server; `.requests` logs every request (path, body, lower-cased headers),
    `.max_in_flight` its peak number of concurrent requests. `default`, when set, answers
    unscripted requests (body -> reply text) instead of the keyword mode."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    max_in_flight: int = 0
    _in_flight: int = 0
    _queue: deque[Action] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    default: Callable[[dict[str, Any]], str] | None = None
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> FakeOpenAI:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- scripting ---------------------------------------------------------------------
    def script(self, *actions: Action | Iterable[Action]) -> None:
        """Queue actions for the next requests (lists from `fail(...)` are flattened)."""
        with self._lock:
            for action in actions:
                self._queue.extend([action] if isinstance(action, Action) else action)

    @staticmethod
    def good(personas: list[str]) -> Action:
        return Action(json.dumps({"personas": personas}))

    @staticmethod
    def text(content: str) -> Action:
        """Any reply text: malformed answers, hallucinated personas, stage outputs."""
        return Action(content)

    @staticmethod
    def slow(seconds: float, personas: list[str] | None = None) -> Action:
        content = None if personas is None else json.dumps({"personas": personas})
        return Action(content, sleep_s=seconds)

    @staticmethod
    def fail(status: int = 500, times: int = 1, retry_after: float | None = None) -> list[Action]:
        headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
        return [Action(status=status, headers=headers) for _ in range(times)]

    @staticmethod
    def respond(handler: Callable[[dict[str, Any]], str]) -> Action:
        return Action(handler=handler)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- server side -------------------------------------------------------------------
    def _next_action(self) -> Action:
        with self._lock:
            return self._queue.popleft() if self._queue else Action()

    def _content(self, action: Action, body: dict[str, Any]) -> str:
        if action.handler is not None:
            return action.handler(body)
        if action.content is not None:
            return action.content
        if self.default is not None:
            return self.default(body)
        messages = body.get("messages", [])
        prompt = str(messages[-1].get("content", "")) if messages else ""
        return json.dumps({"personas": keyword_personas(prompt)})

    def _enter(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append({"path": path, "body": body, "headers": headers})
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
