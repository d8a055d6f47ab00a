"""`promptq worker` as a real subprocess, its output captured to a file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType


class WorkerProcess:
    """Runs ``python -m worker worker`` with exactly the given LLM_*/PROMPTQ_* environment."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        args: tuple[str, ...] = (),
        loglevel: str | None = "INFO",
        processes: int | None = 1,
    ) -> None:
        """``loglevel`` None runs the worker at its default log level (no ``--loglevel``).
        ``processes``: how many worker processes (``--processes``; 1, the default, runs the
        worker in this one process); None leaves it to PROMPTQ_PROCESSES or the cores."""
        clean = {
            k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_", "OPENAI"))
        }
        self.env = {**clean, **env}
        self.log_path = log_path
        self.processes = processes or 1
        if processes is not None:
            args = ("--processes", str(processes), *args)
        self.args = args if loglevel is None else ("--loglevel", loglevel, *args)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "worker", "worker", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout_s: float = 60.0, *, count: int | None = None) -> WorkerProcess:
        """Block until Celery has logged ``count`` times (default: once per worker process)
        that a worker process is consuming."""
        deadline = time.monotonic() + timeout_s
        while self.log().count(" ready.") < (count or self.processes):
            assert self._process is not None
            if self._process.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self._process.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def running(self) -> bool:
        """Whether the process was started and has not exited (nor been stopped) since."""
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def children(self) -> list[int]:
        """The pids of the worker processes a supervisor (``processes`` > 1) runs, from /proc."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == self.pid:
                found.append(int(entry.name))
        return sorted(found)

    def rss_bytes(self) -> int:
        """The worker process's resident memory (VmRSS), from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM) and return at once; stop() then waits for it."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, acknowledging nothing."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def wait_exit(self, timeout_s: float = 20.0) -> int:
        """Wait for the process to exit by itself (after terminate(), say) and return its exit
        status, sending no signal: a supervisor (``processes`` > 1) takes a second SIGTERM, as
        stop() sends, for a cold shutdown. Kills it and fails if it runs on past the timeout."""
        process = self._process
        assert process is not None, "not running"
        try:
            status = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker still running after {timeout_s} s") from None
        self._process = None
        return status

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Warm shutdown (SIGTERM), killing the process if it does not exit in time."""
        self.terminate()
        process, self._process = self._process, None
        if process is None:
            return None
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def __enter__(self) -> WorkerProcess:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()  # a worker that never got ready must not outlive the test
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def worker_fleet(
    env: Mapping[str, str], directory: Path, *, count: int, concurrency: int
) -> Iterator[list[WorkerProcess]]:
    """``count`` workers with the same environment, started together and ready; stopped after."""
    args = ("--concurrency", str(concurrency))
    processes = [
        WorkerProcess(env, directory / f"worker-{n}.log", args=args).start() for n in range(count)
    ]
    try:
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in processes:
            process.stop()
