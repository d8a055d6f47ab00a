"""Scriptable OpenAI-compatible HTTP server (stdlib only) for tests that need a fake model API."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

from worker.fake_provider.replies import BadRequest, embedding_of, plan_embeddings, text_of

# Any path ending so: /v1/chat/completions, Azure's /openai/deployments/<name>/chat/completions,
# Groq's /openai/v1/..., OpenRouter's /api/v1/...
_CHAT_SUFFIX = "/chat/completions"
# OpenAI's /v1/embeddings, Azure's /openai/deployments/<name>/embeddings
_EMBEDDINGS_SUFFIX = "/embeddings"
EMBEDDING_DIMENSIONS = 8  # the size of the vectors the server answers, unless asked otherwise


def echo_vectors(texts: list[str], dimensions: int = EMBEDDING_DIMENSIONS) -> list[list[float]]:
    """The vectors the server answers for ``texts``."""
    return [embedding_of(text, dimensions) for text in texts]


def same_vectors(found: list[list[float]], expected: list[list[float]]) -> bool:
    """The same vectors in the same order, to float32 precision (LiteLLM asks some providers,
    Azure among them, for base64-packed float32 vectors)."""
    return [len(v) for v in found] == [len(v) for v in expected] and all(
        abs(a - b) <= 1e-6
        for f, e in zip(found, expected, strict=True)
        for a, b in zip(f, e, strict=True)
    )


# Google AI Studio's (Gemini's) /v1beta/models/<model>:generateContent
_GEMINI_SUFFIX = ":generateContent"
_MODELS_PATHS = frozenset({"/v1/models", "/models"})


@dataclass(frozen=True)
class Reply:
    """One scripted response.

    ``body``: a dict is sent as JSON; bytes are sent raw (truncated or malformed bodies);
    ``None`` means the default for the route: an echo ChatCompletion (or a model list) when
    ``status`` < 400, an OpenAI-style ``{"error": {...}}`` object otherwise.
    ``headers`` are added to (and override) the default ``Content-Type``/``Content-Length``.
    ``delay_s`` is waited before replying; ``stop()`` interrupts it (the connection is then
    dropped without a reply). ``gate``, when given, is then waited for too: the test sets it to
    let the reply go (``stop()`` interrupts that wait as well).
    """

    status: int = 200
    body: dict[str, Any] | bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    gate: threading.Event | None = None


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the server saw it, recorded before any reply was sent."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float
    query: dict[str, str] = field(default_factory=dict)  # the URL's query parameters


def _messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def _echo_completion(body: dict[str, Any], completion_id: str) -> dict[str, Any]:
    messages = _messages_of(body)
    last_user = next(
        (text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    content = "echo: " + last_user
    prompt_tokens = max(1, sum(len(text_of(m.get("content")).split()) for m in messages))
    completion_tokens = max(1, len(content.split()))
    model = body.get("model")
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model if isinstance(model, str) else "unknown",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _gemini_echo(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A Gemini generateContent reply echoing the last user turn's text."""
    contents = body.get("contents")
    turns = [c for c in contents if isinstance(c, dict)] if isinstance(contents, list) else []
    last_user = next((t for t in reversed(turns) if t.get("role") == "user"), {})
    parts = last_user.get("parts")
    text = " ".join(
        str(p["text"])
        for p in (parts if isinstance(parts, list) else [])
        if isinstance(p, dict) and "text" in p
    )
    content = "echo: " + text
    prompt_tokens = max(1, len(text.split()))
    completion_tokens = max(1, len(content.split()))
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": content}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": completion_tokens,
            "totalTokenCount": prompt_tokens + completion_tokens,
        },
        "modelVersion": model,
    }


def _model_list() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": "test-model", "object": "model", "created": 0, "owned_by": "promptq-tests"}
        ],
    }


def _error_body(status: int) -> dict[str, Any]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return {
        "error": {
            "message": f"scripted error {status}: {phrase}",
            "type": "rate_limit_error" if status == 429 else "api_error",
            "param": None,
            "code": None,
        }
    }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops the SYNs of a burst of new connections (a
    # worker starting a pack's calls at once), which the client then resends a second later.
    request_queue_size = 128

    def __init__(self, owner: ScriptedOpenAIServer, port: int) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "ScriptedOpenAI/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request logging to stderr."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _read_body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            parsed = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            return {}
        return parsed if isinstance(parsed, dict) else {}

    def _serve(self) -> None:
        if not isinstance(self.server, _HTTPServer):
            raise TypeError("handler bound to an unexpected server")
        owner = self.server.owner
        path, _, query = self.path.partition("?")
        body = self._read_body()
        number = owner._record(
            RecordedRequest(
                path=path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                received_at=time.monotonic(),
                query=dict(parse_qsl(query)),
            )
        )

        is_chat = self.command == "POST" and path.endswith(_CHAT_SUFFIX)
        is_gemini = self.command == "POST" and path.endswith(_GEMINI_SUFFIX)
        is_embeddings = self.command == "POST" and path.endswith(_EMBEDDINGS_SUFFIX)
        is_models = self.command == "GET" and path in _MODELS_PATHS
        if not (is_chat or is_gemini or is_embeddings or is_models):
            self._send(404, _error_body(404), {})
            return

        reply = owner._next_reply()
        if reply.delay_s > 0 and owner._stopping.wait(reply.delay_s):
            self.close_connection = True  # stopped while hanging: drop without a reply
            return
        while reply.gate is not None and not reply.gate.wait(0.05):
            if owner._stopping.is_set():
                self.close_connection = True
                return

        payload: dict[str, Any] | bytes
        if reply.body is not None:
            payload = reply.body
        elif reply.status >= 400:
            payload = _error_body(reply.status)
        elif is_chat:
            payload = _echo_completion(body, f"chatcmpl-{number}")
        elif is_gemini:
            model = path.rsplit("/", 1)[-1].removesuffix(_GEMINI_SUFFIX)
            payload = _gemini_echo(body, model)
        elif is_embeddings:
            try:
                payload = plan_embeddings(body, EMBEDDING_DIMENSIONS)[2]
            except BadRequest as exc:
                self._send(400, {"error": {"message": str(exc), "type": "invalid_request"}}, {})
                owner._answered()
                return
        else:
            payload = _model_list()
        self._send(reply.status, payload, reply.headers)
        owner._answered()

    def _send(self, status: int, payload: dict[str, Any] | bytes, extra: dict[str, str]) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        overridden = {k.lower() for k in extra}
        headers = {k: v for k, v in headers.items() if k.lower() not in overridden}
        headers.update(extra)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client gave up (e.g. its timeout fired)


class ScriptedOpenAIServer:
    """OpenAI-compatible server on 127.0.0.1 replying from a script of :class:`Reply`.

    Every request is recorded (before any reply or delay). Each request to a known route
    (``POST .../chat/completions`` or ``POST .../embeddings`` under any prefix, Gemini's
    ``POST .../models/<model>:generateContent``, ``GET /v1/models``) consumes the next
    scripted reply, or ``default`` when the script is empty; other paths get a 404. The
    default 200 reply is an echo in the route's own format.
    """

    def __init__(self, default: Reply | None = None) -> None:
        self.default: Reply = default if default is not None else Reply()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._script: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._replies = 0  # requests answered (sent a reply) since the last reset
        self._counter = itertools.count(1)
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0  # kept across stop() and start(): the base URL stays the same

    def script(self, *replies: Reply) -> None:
        """Append replies, consumed in order, one per request."""
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        """Forget the script and the recorded requests; the default goes back to Reply()."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self._replies = 0
            self.default = Reply()

    def heal(self) -> None:
        """Forget the script and answer every request with Reply() again; keep the record."""
        with self._lock:
            self._script.clear()
            self.default = Reply()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        port = self._httpd.server_address[1]
        return f"http://127.0.0.1:{port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def answered(self) -> int:
        """How many requests got a reply (any status); the rest are pending or were dropped."""
        with self._lock:
            return self._replies

    def calls_by_prompt(self) -> Counter[str]:
        """How many chat requests carried each prompt (the text of the last user message)."""
        return Counter(self.prompts())

    def prompts(self, since: float | None = None) -> list[str]:
        """The prompts (the text of the last user message) of the chat requests, in the order
        they arrived; only those received at or after ``since`` (time.monotonic()) if given."""
        found = []
        for request in self.requests:
            if since is not None and request.received_at < since:
                continue
            users = [m for m in _messages_of(request.body) if m.get("role") == "user"]
            if users:
                found.append(text_of(users[-1].get("content")))
        return found

    def wait_for_requests(self, n: int, timeout_s: float) -> list[RecordedRequest]:
        """Block until at least ``n`` requests were recorded; return them all."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self._requests) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [r.path for r in self._requests]
                    raise AssertionError(
                        f"expected >= {n} request(s) within {timeout_s}s, got {len(seen)}: {seen}"
                    )
                self._changed.wait(remaining)
            return list(self._requests)

    def start(self) -> ScriptedOpenAIServer:
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        self._httpd = _HTTPServer(self, self._port)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="scripted-openai-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (connections are refused until start() serves the same port again);
        wakes delayed handlers, which then drop their connection."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _record(self, request: RecordedRequest) -> int:
        with self._changed:
            self._requests.append(request)
            number = next(self._counter)
            self._changed.notify_all()
        return number

    def _answered(self) -> None:
        with self._lock:
            self._replies += 1

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else self.default
