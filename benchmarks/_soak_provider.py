"""The provider benchmarks/soak.py runs in its own process: it answers by a tag in the prompt
and counts each prompt's calls."""

from __future__ import annotations

import json
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A declared limit far above the soak's rate: a 429 then pauses the fleet for its Retry-After
# (as a real provider's does) without the limiter lowering its rate from it.
LIMIT_HEADERS = {"x-ratelimit-limit-requests": "100000", "x-ratelimit-limit-tokens": "100000000"}


def slow_s(prompt: str) -> float:
    """How long a [slow] prompt's answer takes: 2 to 5 s, fixed by the prompt."""
    return 2.0 + (zlib.crc32(prompt.encode()) % 3000) / 1000


class TagProvider:
    """OpenAI chat completions on 127.0.0.1 (in this process), answering by a tag in the prompt:
    "[429]" gets a 429 with Retry-After: 1 on its first call, "[503]" a 503 on its first call,
    "[slow]" waits 2-5 s; everything else is answered at once with an echo. It counts the calls
    each prompt (the last user message) received, and the calls that carried ``api_key``."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.calls: Counter[str] = Counter()
        self.with_key = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as LiteLLM's HTTP client expects

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._send(404, _error(404, "not found"), {})
                    return
                users = [m for m in body.get("messages", []) if m.get("role") == "user"]
                prompt = str(users[-1].get("content", "")) if users else ""
                keyed = self.headers.get("Authorization") == f"Bearer {owner.api_key}"
                status, headers = owner.decide(prompt, keyed)
                if status == 200 and "[slow]" in prompt and owner._stopping.wait(slow_s(prompt)):
                    self.close_connection = True
                    return
                reply = _error(status, "scripted") if status != 200 else _echo(body, prompt)
                self._send(status, reply, headers)

            def _send(self, status: int, reply: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    for name, value in {**LIMIT_HEADERS, **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the worker gave up, or was killed

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def decide(self, prompt: str, keyed: bool) -> tuple[int, dict[str, str]]:
        with self._lock:
            self.calls[prompt] += 1
            self.with_key += keyed
            first = self.calls[prompt] == 1
        if first and "[429]" in prompt:
            return 429, {"Retry-After": "1"}
        if first and "[503]" in prompt:
            return 503, {}
        return 200, {}

    def calls_of(self, prompt: str) -> int:
        with self._lock:
            return self.calls[prompt]

    def start(self) -> TagProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a fleet's burst of new connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A killed worker resets its connections: nothing to report."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _echo(body: dict[str, Any], prompt: str) -> dict[str, Any]:
    content = f"echo: {prompt}"
    return {
        "id": f"chatcmpl-{zlib.crc32(prompt.encode()):08x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model", "unknown")),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 14, "total_tokens": 26},
    }


def _error(status: int, message: str) -> dict[str, Any]:
    kind = "rate_limit_error" if status == 429 else "api_error"
    return {"error": {"message": f"{message} {status}", "type": kind, "param": None, "code": None}}
