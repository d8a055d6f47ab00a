"""The fake provider's aiohttp application and counters, and FakeProvider running it in a thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import math
import random
import threading
import time
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from .batches import BatchStore, NotFound
from .config import FakeProviderConfig, url_host
from .limits import Limiter, reset_duration
from .replies import BadRequest, Payload, error_body, plan_chat, plan_embeddings

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
EMBEDDINGS_PATHS = ("/v1/embeddings", "/embeddings")
MODELS_PATHS = ("/v1/models", "/models")
FAULT_STATUSES = (500, 502, 503)
DEFAULT_MODEL = "fake-model"


class Server:
    """The aiohttp application and its state; all of it lives on one event loop."""

    def __init__(self, config: FakeProviderConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._limiter = Limiter(
            config.rpm, config.tpm, clock, config.burst_s, shape=config.shape, ramp=config.ramp
        )
        self._faults = random.Random(config.seed)  # noqa: S311  (a reproducible sequence is the point)
        self._jitter = random.Random(f"jitter:{config.seed}")  # noqa: S311
        self._ids = itertools.count(1)
        self._models = {DEFAULT_MODEL}
        self._counts = {"requests": 0, "ok": 0, "rate_limited": 0, "errors": 0, "bad_requests": 0}
        self._by_path: dict[str, int] = {}
        self._batches = BatchStore(
            time.time,
            delay_s=config.batch_delay_s,
            failure_rate=config.batch_failure_rate,
            expired_share=config.batch_expired_share,
            dimensions=config.dimensions,
            seed=config.seed,
        )
        self._runner: web.AppRunner | None = None
        self._app = web.Application(client_max_size=256 * 1024 * 1024)
        routes = self._app.router
        for path in CHAT_PATHS + EMBEDDINGS_PATHS:
            routes.add_post(path, self._generate)
        for path in MODELS_PATHS:
            routes.add_get(path, self._list_models)
        routes.add_post("/v1/files", self._upload)
        routes.add_get("/v1/files/{id}", self._file)
        routes.add_get("/v1/files/{id}/content", self._file_content)
        routes.add_post("/v1/batches", self._create_batch)
        routes.add_get("/v1/batches/{id}", self._batch)
        routes.add_post("/v1/batches/{id}/cancel", self._cancel_batch)
        routes.add_get("/stats", self._stats)
        routes.add_route("*", "/{tail:.*}", self._unknown)

    async def start(self) -> int:
        """Listen; return the bound port."""
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            # A deep backlog: benchmarks open hundreds of connections at once.
            site = web.TCPSite(runner, self.config.host, self.config.port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port: int = runner.addresses[0][1]
        return port

    async def close(self) -> None:
        """Stop listening; requests in flight get up to 1 s to finish."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def snapshot(self) -> Payload:
        """Counters: requests (all but /stats), ok, rate_limited, errors (5xx), bad_requests
        (other 4xx), and by_path (unknown paths counted as "(other)")."""
        return {**self._counts, "by_path": dict(self._by_path)}

    def _count(self, path: str) -> None:
        self._counts["requests"] += 1
        self._by_path[path] = self._by_path.get(path, 0) + 1

    def _reply(self, status: int, payload: Payload, headers: dict[str, str]) -> web.Response:
        if status == 200:
            self._counts["ok"] += 1
        elif status == 429:
            self._counts["rate_limited"] += 1
        elif status >= 500:
            self._counts["errors"] += 1
        else:
            self._counts["bad_requests"] += 1
        body = json.dumps(payload).encode()
        return web.Response(
            body=body, status=status, headers=headers, content_type="application/json"
        )

    async def _generate(self, request: web.Request) -> web.Response:
        self._count(request.path)
        try:
            body = await _json_object(request)
            if request.path in CHAT_PATHS:
                model, tokens, reply = plan_chat(body)
            else:
                model, tokens, reply = plan_embeddings(body, self.config.dimensions)
        except BadRequest as exc:
            return self._bad_request(exc)
        self._models.add(model)
        wait, headers = self._limiter.admit(model, tokens)
        if wait > 0:
            return self._rate_limited(model, tokens, wait, headers)
        fault = 0
        if self.config.error_rate > 0:
            drawn, status = self._faults.random(), self._faults.choice(FAULT_STATUSES)
            fault = status if drawn < self.config.error_rate else 0
        delay = self.config.latency_s
        if self.config.jitter_s > 0:
            delay += self._jitter.uniform(-self.config.jitter_s, self.config.jitter_s)
        if delay > 0:
            await asyncio.sleep(delay)
        if fault:
            message = f"fake-provider injected error {fault}"
            return self._reply(fault, error_body(message, "server_error"), headers)
        if reply["object"] == "chat.completion":
            reply = {"id": f"chatcmpl-{next(self._ids)}", **reply}
        return self._reply(200, reply, headers)

    def _rate_limited(
        self, model: str, tokens: int, wait: float, headers: dict[str, str]
    ) -> web.Response:
        if math.isinf(wait):  # larger than the whole tpm budget: waiting will not help
            message = (
                f"Request too large for {model} on tokens per min (TPM): "
                f"Limit {self.config.tpm}, Requested {tokens}."
            )
            body = error_body(message, "tokens", None, "rate_limit_exceeded")
            return self._reply(429, body, headers)
        wait_ms = math.ceil(wait * 1000 - 1e-6)  # whole milliseconds, float noise aside
        headers["retry-after"] = str(math.ceil(wait_ms / 1000))
        headers["retry-after-ms"] = str(wait_ms)
        message = f"Rate limit reached for {model}. Please try again in {reset_duration(wait)}."
        return self._reply(
            429, error_body(message, "requests", None, "rate_limit_exceeded"), headers
        )

    async def _upload(self, request: web.Request) -> web.Response:
        self._count(request.path)
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
            message = "a multipart form with 'file' and 'purpose' is required"
            return self._bad_request(BadRequest(message, "file"))
        stored = self._batches.add_file(upload.filename, purpose, upload.file.read())
        return self._reply(200, stored.payload(), {})

    async def _file(self, request: web.Request) -> web.Response:
        self._count("/v1/files/{id}")
        return self._found(lambda: self._batches.file(request.match_info["id"]).payload())

    async def _file_content(self, request: web.Request) -> web.Response:
        self._count("/v1/files/{id}/content")
        try:
            stored = self._batches.file(request.match_info["id"])
        except NotFound as exc:
            return self._not_found(exc)
        self._counts["ok"] += 1
        return web.Response(body=stored.content, content_type="application/octet-stream")

    async def _create_batch(self, request: web.Request) -> web.Response:
        self._count(request.path)
        try:
            batch = self._batches.create_batch(await _json_object(request))
        except BadRequest as exc:
            return self._bad_request(exc)
        return self._reply(200, batch.payload(), {})

    async def _batch(self, request: web.Request) -> web.Response:
        self._count("/v1/batches/{id}")
        return self._found(lambda: self._batches.batch(request.match_info["id"]).payload())

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        self._count("/v1/batches/{id}/cancel")
        return self._found(lambda: self._batches.cancel(request.match_info["id"]).payload())

    def _found(self, payload: Callable[[], Payload]) -> web.Response:
        try:
            return self._reply(200, payload(), {})
        except NotFound as exc:
            return self._not_found(exc)

    def _not_found(self, exc: NotFound) -> web.Response:
        return self._reply(404, error_body(str(exc), "invalid_request_error"), {})

    def _bad_request(self, exc: BadRequest) -> web.Response:
        return self._reply(400, error_body(str(exc), "invalid_request_error", exc.param), {})

    async def _list_models(self, request: web.Request) -> web.Response:
        self._count(request.path)
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "promptq-fake-provider"}
            for model in sorted(self._models)
        ]
        return self._reply(200, {"object": "list", "data": data}, {})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _unknown(self, request: web.Request) -> web.Response:
        self._count("(other)")
        known = request.path in CHAT_PATHS + EMBEDDINGS_PATHS + MODELS_PATHS
        message = f"{request.method} {request.path} is not served by fake-provider"
        return self._reply(405 if known else 404, error_body(message, "invalid_request_error"), {})


async def _json_object(request: web.Request) -> Payload:
    """The request's body, a JSON object (BadRequest otherwise)."""
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise BadRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


class FakeProvider:
    """The fake provider on its own event loop in a daemon thread (tests, benchmarks, batch).

    ``clock`` (default ``time.monotonic``) drives the rate limiter only, so a test can move
    the limiter's time forward without waiting.
    """

    def __init__(
        self,
        config: FakeProviderConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else FakeProviderConfig()
        self._server = Server(self.config, clock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("fake provider not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``, what an OpenAI client's base_url should be."""
        return f"{url_host(self.config.host)}:{self.port}/v1"

    def start(self) -> FakeProvider:
        """Listen (raising OSError if the address is taken) and serve in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("fake provider already started")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(ready),), name="fake-provider", daemon=True
        )
        self._thread.start()
        self._port = ready.result(timeout=30)
        return self

    async def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        try:
            ready.set_result(await self._server.start())
        except Exception as exc:
            ready.set_exception(exc)
            return
        try:
            await self._stopping.wait()
        finally:
            await self._server.close()

    def stats(self) -> Payload:
        """The /stats counters (they stay readable after stop())."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return self._server.snapshot()

        async def snapshot() -> Payload:
            return self._server.snapshot()

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout=10)

    def stop(self) -> None:
        """Stop serving (requests in flight get up to 1 s); safe to call twice."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
