"""Embedded mode: a Redis-compatible server and a Celery worker inside one process."""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from celery.worker import WorkController
from fakeredis import TcpFakeServer
from fakeredis._clients._tcp_server import TCPFakeRequestHandler

from worker.app.celery_app import PromptqCelery, create_app, with_concurrency
from worker.settings import Settings

START_TIMEOUT_S = 30.0


class _ErrorReplyHandler(TCPFakeRequestHandler):
    """fakeredis' TCP handler closes the connection after any error reply (fakeredis 2.40);
    a real Redis answers the error and carries on. Scripts rely on that: EVALSHA answers
    NOSCRIPT, and the client then sends EVAL on the same connection."""

    def setup(self) -> None:
        super().setup()
        read_response = self.current_client.read_response

        def read_error_as_reply(*args: Any, **kwargs: Any) -> Any:
            try:
                return read_response(*args, **kwargs)
            except redis.ResponseError as exc:
                return exc  # the handler's writer encodes an exception as an error reply

        self.current_client.read_response = read_error_as_reply  # type: ignore[method-assign]


class FakeRedisServer:
    """An in-memory Redis-protocol server on a free loopback port (fakeredis, Lua included).

    It speaks to the same redis-py, kombu and promptq code as a real Redis, slower (about ten
    prompts/s through Celery, measured here); nothing persists.
    """

    description = "an in-process fakeredis server"

    def __init__(self) -> None:
        self._server = TcpFakeServer(("127.0.0.1", 0))
        self._server.RequestHandlerClass = _ErrorReplyHandler
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="promptq-embedded-redis", daemon=True
        )

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"redis://127.0.0.1:{port}/0"

    def start(self) -> FakeRedisServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServerProcess:
    """A private ``redis-server`` on a free loopback port, data and log in ``directory``."""

    description = "a private redis-server"

    def __init__(
        self,
        binary: str,
        directory: Path,
        *,
        appendonly: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.appendonly = appendonly
        self.die_with_parent = die_with_parent
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> RedisServerProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.directory), "--logfile", "redis.log"]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
        self._process = subprocess.Popen(  # noqa: S603  (our own argv)
            args,
            stdout=subprocess.DEVNULL,
            # Embedded mode starts its server before any thread of its own.
            preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server on port {self.port} did not start; "
                            f"see {self.directory / 'redis.log'}"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent() -> None:
    """In the child: ask Linux to end it when the process that started it dies, so a killed
    `promptq batch` leaves no private redis-server behind. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def embedded_redis(directory: Path) -> RedisServerProcess | FakeRedisServer:
    """A private redis-server when one is installed (fast), else fakeredis (needs nothing)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return FakeRedisServer()
    return RedisServerProcess(binary, directory, die_with_parent=True)


class _WorkController(WorkController):  # type: ignore[misc]  # Celery is untyped
    """A Celery worker that signals when its consumer is ready."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.ready.set()


class EmbeddedWorker:
    """The promptq Celery worker running in threads of this process.

    Same app, task, retry policy and classification as ``promptq worker``; retries wait parked
    in the embedded Redis as they do on a fleet's.
    """

    def __init__(self, settings: Settings, *, concurrency: int | None = None) -> None:
        settings = with_concurrency(settings, concurrency)
        self.app: PromptqCelery = create_app(settings)
        # Celery's thread pool resolves tasks through the process-wide default app.
        self.app.set_default()
        # Nothing outside this process can reach an embedded worker's control channel.
        self.app.conf.worker_enable_remote_control = False
        self._controller = _WorkController(
            app=self.app,
            pool="threads",
            concurrency=settings.queue.concurrency,
            hostname=f"promptq-embedded-{id(self)}@localhost",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
        )
        self._thread = threading.Thread(
            target=self._controller.start, name="promptq-embedded-worker", daemon=True
        )

    def start(self) -> EmbeddedWorker:
        self._thread.start()
        if not self._controller.ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the embedded worker did not start within {START_TIMEOUT_S} s")
        return self

    def stop(self) -> None:
        self._controller.stop(in_sighandler=False)
        self._thread.join(START_TIMEOUT_S)
        # The worker has stopped: this process holds nothing more (its Redis goes next).
        self.app.heartbeat.stop()
        self.app.runtime.close()


class Embedded:
    """Both together: ``with Embedded(settings) as url:`` gives a broker URL with a worker on it."""

    def __init__(self, settings: Settings, *, concurrency: int | None = None) -> None:
        self._settings = settings
        self._concurrency = concurrency
        self._directory = tempfile.TemporaryDirectory(prefix="promptq-embedded-")
        self._redis = embedded_redis(Path(self._directory.name))
        self._worker: EmbeddedWorker | None = None
        # The command that embeds a worker reports failures itself (a summary by kind).
        logging.getLogger("promptq.worker").setLevel(logging.ERROR)

    @property
    def description(self) -> str:
        return self._redis.description

    def __enter__(self) -> str:
        self._redis.start()
        # The command reports its own progress: no metrics server, whose port could be a
        # worker's on this machine.
        update = {"redis_url": self._redis.url, "metrics_port": None}
        queue = self._settings.queue.model_copy(update=update)
        settings = self._settings.model_copy(update={"queue": queue})
        self._worker = EmbeddedWorker(settings, concurrency=self._concurrency).start()
        return self._redis.url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._worker is not None:
            self._worker.stop()
        self._redis.stop()
        self._directory.cleanup()
