"""The parts benchmarks/soak.py runs: an AOF Redis it can kill, a worker fleet it can kill,
and the worker logs read back as deliveries (the provider: _soak_provider)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from api_client._constants import KEY_PREFIX, PARKED_KEY, PRIORITY_LISTS, QUEUE, UNACKED_KEY
from api_client._polling import text_of
from worker.app.embedded import START_TIMEOUT_S, RedisServerProcess
from worker.fleet.custody import taken_keys
from worker.fleet.schedule import ready_messages

# --- Redis -------------------------------------------------------------------------------------


class AofRedis(RedisServerProcess):
    """The private redis-server with AOF on and ``appendfsync always`` (RedisServerProcess
    starts it with ``everysec``: set on each start, before the soak relies on it), which can
    be SIGKILLed and started again on the same port and data directory."""

    def __init__(self, directory: Path) -> None:
        super().__init__(shutil.which("redis-server") or "redis-server", directory, appendonly=True)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> AofRedis:
        super().start(timeout_s)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        try:
            client.config_set("appendfsync", "always")
            if client.config_get("appendfsync") != {"appendfsync": "always"}:
                raise RuntimeError("redis-server did not take appendfsync always")
        finally:
            client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync; what survives is what the AOF already holds."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()


def _blob(values: Iterable[Any]) -> bytes:
    return b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in values)


def where_is(client: redis.Redis, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """For each job: its promptq:state and starts values, and which of the queue (the
    scheduler's structure, any priority list), the worker processes' taken lists, kombu's
    unacked hash and the parked set hold a message naming it."""
    pushed = [m for name in (QUEUE, *PRIORITY_LISTS) for m in client.lrange(name, 0, -1)]
    queued = _blob([*pushed, *ready_messages(client)])
    taken = _blob(m for key in taken_keys(client) for m in client.lrange(key, 0, -1))
    unacked = _blob(client.hvals(UNACKED_KEY))
    parked = _blob(client.zrange(PARKED_KEY, 0, -1))
    found = {}
    for job_id in job_ids:
        state, starts = client.mget(f"{KEY_PREFIX}state:{job_id}", f"{KEY_PREFIX}starts:{job_id}")
        key = job_id.encode()
        found[job_id] = {
            "state": text_of(state) if state else None,
            "starts": int(starts) if starts else None,
            "in": [
                n
                for n, blob in (
                    ("queue", queued),
                    ("taken", taken),
                    ("unacked", unacked),
                    ("parked", parked),
                )
                if key in blob
            ],
        }
    return found


# --- the worker fleet --------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
                if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(found)


def process_index(pid: int) -> int:
    """The ``--process-index`` a supervisor gave its worker process."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(b"--process-index") + 1])


@dataclass
class Worker:
    """One `promptq worker` command the soak started: one process, or a supervisor of two."""

    label: str
    process: subprocess.Popen[bytes]
    log: Path
    processes: int

    def ready(self) -> bool:
        """Every worker process it runs has said ready (counted over its whole log)."""
        return self.log.read_text(errors="replace").count(" ready.") >= self.processes


@dataclass
class Kill:
    """A SIGKILL: of a single worker, one process of a group, or a whole group."""

    at: float  # wall-clock time, just before the signal
    kind: str  # single, child, group
    label: str
    log: Path
    since: dict[str, float]  # process name in the log -> when this incarnation began


class Fleet:
    """`python -m worker worker` commands in cwd with ``env``, each logging to its own file."""

    def __init__(self, env: dict[str, str], cwd: Path, logs: Path, concurrency: int) -> None:
        self.env, self.cwd, self.logs, self.concurrency = env, cwd, logs, concurrency
        self.workers: list[Worker] = []
        self.kills: list[Kill] = []
        self._started = 0
        self._child_since: dict[tuple[Path, str], float] = {}

    def start(self, processes: int) -> Worker:
        self._started += 1
        label = f"{'g' if processes > 1 else 'w'}{self._started:02d}"
        log = self.logs / f"worker-{label}.log"
        command = [sys.executable, "-m", "worker", "worker", "--processes", str(processes)]
        command += ["-c", str(self.concurrency), "--loglevel", "INFO"]
        setpriv = shutil.which("setpriv")  # the workers die with the soak, even a killed one
        if setpriv:
            command = [setpriv, "--pdeathsig", "KILL", *command]
        with log.open("ab") as out:
            process = subprocess.Popen(
                command,
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the soak, which stops them
            )
        worker = Worker(label, process, log, processes)
        self.workers.append(worker)
        return worker

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(w.ready() for w in self.workers):
            for worker in self.workers:
                if worker.process.poll() is not None:
                    raise RuntimeError(f"worker {worker.label} exited; see {worker.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after {timeout_s:g} s; see {self.logs}")
            time.sleep(0.1)

    def kill_random(self, rng: random.Random, group_share: float, child_share: float) -> Kill:
        """SIGKILL a whole group (``group_share`` of the time), one process of a group
        (``child_share``; its supervisor restarts it) or a single worker, among the ready ones,
        and start a replacement for what no supervisor restarts."""
        ready = [w for w in self.workers if w.ready()] or self.workers
        groups = [w for w in ready if w.processes > 1]
        singles = [w for w in ready if w.processes == 1]
        draw = rng.random()
        if groups and (draw < group_share or not singles):
            return self._kill_group(rng.choice(groups))
        if groups and draw < group_share + child_share:
            return self._kill_child(rng, rng.choice(groups))
        return self._kill_single(rng.choice(singles))

    def _record(self, kind: str, worker: Worker, since: dict[str, float]) -> Kill:
        kill = Kill(time.time(), kind, worker.label, worker.log, since)
        self.kills.append(kill)
        return kill

    def _kill_single(self, worker: Worker) -> Kill:
        kill = self._record("single", worker, {"MainProcess": 0.0})
        worker.process.kill()
        worker.process.wait()
        self.workers.remove(worker)
        self.start(1)
        return kill

    def _kill_child(self, rng: random.Random, worker: Worker) -> Kill:
        pid = rng.choice(children_of(worker.process.pid))
        name = f"worker-{process_index(pid)}"
        kill = self._record("child", worker, {name: self._child_since.get((worker.log, name), 0.0)})
        os.kill(pid, signal.SIGKILL)
        self._child_since[(worker.log, name)] = kill.at
        return kill

    def _kill_group(self, worker: Worker) -> Kill:
        names = [f"worker-{i}" for i in range(1, worker.cli.supervisor + 1)]
        since = {name: self._child_since.get((worker.log, name), 0.0) for name in names}
        pid = worker.process.pid
        os.kill(pid, signal.SIGSTOP)  # so it neither restarts a child nor SIGTERMs them
        children = children_of(pid)
        kill = self._record("group", worker, since)
        for child in children:
            os.kill(child, signal.SIGKILL)
        worker.process.kill()
        worker.process.wait()
        self.workers.remove(worker)
        self.start(worker.cli.supervisor)
        return kill

    def stop(self, timeout_s: float = 30.0) -> None:
        """Warm shutdown of every worker (SIGTERM), SIGKILL for any still there after
        ``timeout_s``; a supervisor's processes with it."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for child in children_of(worker.process.pid):
                    os.kill(child, signal.SIGKILL)
                worker.process.kill()
                worker.process.wait()
        self.workers.clear()


# --- the worker logs ---------------------------------------------------------------------------

# Celery's lines at INFO: "[2026-01-02 03:04:05,678: INFO/MainProcess] Task
# promptq.complete[<id>] received" (a delivery), then "... succeeded in ...", "... retry: ...",
# "... failed: ..." or "... raised ..." (that delivery ended).
_TASK_LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/([\w-]+)\] "
    r"Task promptq\.\w+\[([^\]]+)\] (\w+)"
)


@dataclass(frozen=True)
class Event:
    at: float  # wall-clock time of the line
    log: Path
    name: str  # the process name in the line
    job_id: str
    received: bool  # else: the delivery ended


def read_events(logs: list[Path]) -> list[Event]:
    events = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            found = _TASK_LINE.match(line)
            if found:
                stamp, name, job_id, what = found.groups()
                at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append(Event(at, log, name, job_id, what == "received"))
    events.sort(key=lambda e: e.at)
    return events


# The killed process's own last lines can carry a time up to this much after the time taken
# just before the signal; its replacement logs nothing that soon.
KILL_SLACK_S = 0.3


def by_killed(kill: Kill, event: Event) -> bool:
    """Whether the line was written by a process this kill ended."""
    since = kill.since.get(event.name)
    return (
        event.log == kill.log and since is not None and since < event.at <= kill.at + KILL_SLACK_S
    )


@dataclass
class KillFigures:
    held: list[list[str]] = field(default_factory=list)  # per kill: the jobs it held
    back_after_s: list[float] = field(default_factory=list)  # per held job: kill -> received
    never_back: list[str] = field(default_factory=list)


def held_at_kills(
    kills: list[Kill], events: list[Event], ended_at: dict[str, float]
) -> KillFigures:
    """For each kill, the jobs its processes had received and not finished (a 'received' line
    with no end line after it) that had no outcome yet (``ended_at``: job id -> wall-clock time
    its outcome was seen), and for each the time until some worker received it again.

    The outcome matters: a delivery can be dropped without an end line (Celery forgets the
    retries it holds when its Redis connection restarts; the message comes back after the
    visibility timeout), so a process can count a job it no longer holds."""
    figures = KillFigures()
    for kill in kills:
        open_count: Counter[str] = Counter()
        for event in events:
            if by_killed(kill, event):
                open_count[event.job_id] += 1 if event.received else -1
        held = sorted(
            job
            for job, count in open_count.items()
            if count > 0 and ended_at.get(job, float("inf")) > kill.at
        )
        figures.held.append(held)
        for job_id in held:
            again = next(
                (
                    e.at
                    for e in events
                    if e.job_id == job_id
                    and e.received
                    and e.at > kill.at
                    and not by_killed(kill, e)
                ),
                None,
            )
            if again is None:
                figures.never_back.append(job_id)
            else:
                figures.back_after_s.append(again - kill.at)
    return figures


def in_flight_at(
    at: float, events: list[Event], kills: list[Kill], ended_at: dict[str, float]
) -> set[str]:
    """The jobs without an outcome that a live worker process had received and not finished
    at wall-clock time ``at`` (what a process killed before then held is not counted)."""
    open_count: Counter[tuple[Path, str, str]] = Counter()
    for event in events:
        if event.at > at:
            break
        if any(kill.at < at and by_killed(kill, event) for kill in kills):
            continue
        open_count[(event.log, event.name, event.job_id)] += 1 if event.received else -1
    return {
        job
        for (_, _, job), count in open_count.items()
        if count > 0 and ended_at.get(job, float("inf")) > at
    }
