"""A private redis-server on a free loopback port, which a test can stop and restart."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from types import TracebackType

import redis

from worker.app.embedded import RedisServerProcess


class RedisServer(RedisServerProcess):
    """The product's private redis-server, with a client and a context manager for tests."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (.ci/run installs it with apt)")
        super().__init__(binary, directory, appendonly=appendonly)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last fsync; start() brings it back on the same port and data."""
        process, self._process = self._process, None
        assert process is not None, "not running"
        process.kill()
        process.wait()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections on the port, but nothing answers."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT, undoing pause()."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
