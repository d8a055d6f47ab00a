"""The supervisor of `promptq worker --processes N`: starts, stops and replaces worker processes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from worker.errors import EXIT_CRASH_LOOP, EXIT_USAGE

# A child that dies is started again after RESTART_FIRST_S, doubling for each further death of
# that child within CRASH_WINDOW_S, up to RESTART_MAX_S; a child that dies more than
# CRASH_LIMIT times within CRASH_WINDOW_S stops the whole worker.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
CRASH_WINDOW_S = 60.0
CRASH_LIMIT = 5


def default_processes() -> int:
    """One worker process per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class _Slot:
    """One of the N worker processes, across its restarts."""

    index: int  # 1..N: the child's node name and metrics port follow it
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None  # monotonic time of a pending restart
    deaths: deque[float] = field(default_factory=deque)  # monotonic times, within the window


class Supervisor:
    """Runs ``count`` children (``command(index)`` for index 1..count) until told to stop.

    SIGTERM or SIGINT asks every child for a warm shutdown (SIGTERM: calls in flight finish,
    held jobs go back to the queue); a second one asks for a cold one (SIGQUIT). The children
    run in their own process group, so a terminal's Ctrl-C reaches them once, through here,
    and die with this process (SIGTERM) if it is killed. A child that dies unexpectedly is
    started again with a backoff; one that exits 2 (a bad setting) stops the whole worker.
    """

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        count: int,
        *,
        say: Callable[[str], None] | None = None,
        restart_first_s: float = RESTART_FIRST_S,
        crash_limit: int = CRASH_LIMIT,
    ) -> None:
        self._command = command
        self._restart_first_s = restart_first_s
        self._crash_limit = crash_limit
        self._slots = [_Slot(index) for index in range(1, count + 1)]
        self._say = say or _to_stderr
        self._stopping = 0  # shutdown signals received
        self._status = 0
        self._received: list[int] = []

    def run(self) -> int:
        """Start the children, supervise them until they have all exited; the exit status."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        previous_fd = signal.set_wakeup_fd(wake_write)
        try:
            self._say(f"starting {len(self._slots)} worker processes")
            for slot in self._slots:
                self._start(slot)
            while any(
                slot.process is not None or slot.restart_at is not None for slot in self._slots
            ):
                self._wait(wake_read)
                self._handle_signals()
                self._reap()
                self._restart_due()
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(wake_read)
            os.close(wake_write)
        return self._status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)

    def _wait(self, wake_read: int) -> None:
        """Sleep until a signal arrives, a restart is due, or a second has passed."""
        timeout_s = 1.0
        pending = [s.restart_at for s in self._slots if s.restart_at is not None]
        if pending:
            timeout_s = max(0.0, min(timeout_s, min(pending) - time.monotonic()))
        with contextlib.suppress(InterruptedError):
            select.select([wake_read], [], [], timeout_s)
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_read, 512):
                pass

    def _handle_signals(self) -> None:
        received, self._received = self._received, []
        for signum in received:
            if signum == signal.SIGCHLD:
                continue
            self._stopping += 1
            if self._stopping == 1:
                self._say("warm shutdown: calls in flight finish (signal again to stop at once)")
                self._signal_children(signal.SIGTERM)
            elif self._stopping == 2:  # the second signal
                self._say("cold shutdown: stopping the worker processes now")
                self._signal_children(signal.SIGQUIT)
            for slot in self._slots:
                slot.restart_at = None

    def stop(self, status: int) -> None:
        """Stop every child (warm shutdown) and end with ``status``."""
        self._status = max(self._status, status)
        if not self._stopping:
            self._stopping = 1
            self._signal_children(signal.SIGTERM)
        for slot in self._slots:
            slot.restart_at = None

    def _signal_children(self, signum: int) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.process = subprocess.Popen(  # noqa: S603  (our own argv)
            list(self._command(slot.index)),
            process_group=0,  # signals reach the children through the supervisor only
            preexec_fn=_stop_with_parent,  # noqa: PLW1509  (no threads here)
        )

    def _reap(self) -> None:
        for slot in self._slots:
            process = slot.process
            if process is None or process.poll() is None:
                continue
            slot.process = None
            status = process.returncode
            if self._stopping:
                if status not in (0, -signal.SIGTERM):
                    self._status = max(self._status, 1)
                continue
            self._died(slot, process.pid, status)

    def _died(self, slot: _Slot, pid: int, status: int) -> None:
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        if status == 0:
            self._say(f"worker process {slot.index} (pid {pid}) stopped; not restarted")
            return
        if status == EXIT_USAGE:
            self._say(f"worker process {slot.index} (pid {pid}) {how}: stopping the others")
            self.stop(EXIT_USAGE)
            return
        now = time.monotonic()
        slot.deaths.append(now)
        while slot.deaths and slot.deaths[0] < now - CRASH_WINDOW_S:
            slot.deaths.popleft()
        if len(slot.deaths) > self._crash_limit:
            self._say(
                f"worker process {slot.index} (pid {pid}) {how}, its {len(slot.deaths)}th death "
                f"within {CRASH_WINDOW_S:g} s: giving up, stopping the others"
            )
            self.stop(EXIT_CRASH_LOOP)
            return
        delay_s = min(RESTART_MAX_S, self._restart_first_s * 2 ** (len(slot.deaths) - 1))
        self._say(f"worker process {slot.index} (pid {pid}) {how}; restarting in {delay_s:g} s")
        slot.restart_at = now + delay_s

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self._stopping:
                self._start(slot)


def _to_stderr(message: str) -> None:
    print(f"promptq worker: {message}", file=sys.stderr, flush=True)


def _stop_with_parent() -> None:
    """In a child: Linux sends it SIGTERM (a warm shutdown) when the supervisor dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
