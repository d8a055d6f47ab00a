"""Chaos soak: does any job get stranded when workers and Redis are SIGKILLed? (issue 13)

One run, everything on 127.0.0.1: a private redis-server (AOF, appendfsync always), a provider
in this process that answers by a tag in the prompt ("[429]": 429 with Retry-After on its
first call, "[503]": 503 on its first call, "[slow]": 2-5 s, else at once) and counts each
prompt's calls, and a fleet of three `promptq worker --processes 1 -c C` and one
`--processes 2` group, all at --loglevel INFO with a canary API key. An agent thread submits
waves of W unique mixed prompts every 2 s with idempotency keys, retrying a key while Redis is
down until it is accepted.

- fault-free phase (--clean-minutes): the waves alone, then a drain;
- faults phase (--minutes): the same waves while the soak SIGKILLs a random worker process
  every 10-20 s (a single worker, replaced at once; one process of the group, which its
  supervisor restarts; or the whole group, replaced), and SIGKILLs redis-server and starts it
  again on the same port and data (after 2-5 s down) --redis-restarts times, spread over the
  phase. Then the kills stop, the workers keep running, and every job gets --drain-s to end.

Reported: jobs, kills, Redis restarts, jobs stranded (not terminal after the drain: their
state and where a message for them is), jobs recovered by the safety net (`promptq:recovery`),
failures by kind, the worst provider calls per job against 1 + retries + redeliveries, the time
from a kill to its jobs being received again (from the workers' logs), throughput with faults
against without, and whether the canary key leaked. Exit status 0 when nothing is stranded and
nothing leaked, else 1. A table on stdout; --json PATH writes the same figures. How they are read:

- a job's deliveries come from Celery's INFO lines ("Task promptq.complete[<id>] received", then
  "succeeded"/"retry"/...): a kill held the jobs its processes received and had not ended; a
  held job is back when any other process logs receiving it;
- redeliveries of a job = the kills that held it + the Redis restarts it was in flight through;
  its bound is 1 + LLM_NUM_RETRIES + redeliveries, against the calls the provider counted;
- throughput = jobs that ended between the first submit and the last wave / that time (also
  shown: all that ended / until the last outcome).

    .venv/bin/python benchmarks/soak.py [--minutes 5] [--clean-minutes 1]
        [--drain-s 180] [--seed 1] [--json PATH] [--logs DIR] [--wave-size 20]
        [--concurrency 16] [--redis-restarts 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from types import FrameType

import redis
from _soak_parts import AofRedis, Fleet, read_events, where_is
from _soak_provider import TagProvider
from _soak_report import Phase, PhaseReport, Report, Tracked, phase_report, show

import worker
from api_client import BrokerUnavailable, Client, JobFailed, JobNotFound
from api_client._constants import RECOVERY_KEY
from api_client._polling import text_of
from tests.support.invariants import dump_values

ROOT = Path(__file__).resolve().parent.parent
MODEL = "openai/gpt-4o-mini"  # LiteLLM prices it; the provider answers for any name
RECOVERY_FIELDS = ("jobs_republished", "jobs_abandoned", "messages_returned", "dead_workers")
# Retry waits scaled down; the heartbeat timeout and the visibility timeout (an hour) as users
# get them: a job waiting on the visibility timeout is still unfinished after the drain.
SETTINGS = {
    "LLM_NUM_RETRIES": "3",
    "LLM_RETRY_MIN_WAIT": "0.5",
    "LLM_RETRY_MAX_WAIT": "2",
    "LLM_RETRY_MULTIPLIER": "0.5",
    "LLM_TIMEOUT": "10",
}
TAGS = {"[429]": 0.1, "[503]": 0.1, "[slow]": 0.1}  # each tag's share of a wave
GROUP_SHARE, CHILD_SHARE = 0.15, 0.15  # of the kills: a whole group; one process of it
REDIS_DOWN_S = (2.0, 5.0)


class Book:
    """The jobs submitted, and which have ended; shared by the agent, collector and main."""

    def __init__(self) -> None:
        self.jobs: dict[str, Tracked] = {}
        self.pending: set[str] = set()
        self.changed = threading.Condition()
        self.submit_retries: dict[str, int] = {}

    def add(self, job: Tracked) -> None:
        with self.changed:
            self.jobs[job.job_id] = job
            self.pending.add(job.job_id)

    def settle(self, job_id: str, outcome: str) -> None:
        with self.changed:
            job = self.jobs[job_id]
            if outcome != "missing":
                job.finished, job.finished_wall = time.monotonic(), time.time()
            job.outcome = outcome
            self.pending.discard(job_id)
            self.changed.notify_all()

    def of(self, phase: str) -> list[Tracked]:
        with self.changed:
            return [job for job in self.jobs.values() if job.phase == phase]


class Soak:
    """The agent and collector threads and the chaos, over one Redis and one fleet."""

    def __init__(
        self, args: argparse.Namespace, redis_server: AofRedis, fleet: Fleet, book: Book
    ) -> None:
        self.args, self.redis_server, self.fleet, self.book = args, redis_server, fleet, book
        self.rng = random.Random(args.seed)
        self.nonce = uuid.uuid4().hex[:8]  # idempotency keys unique to this run

    def agent(
        self, phase: Phase, rng: random.Random, stop: threading.Event, errors: list[BaseException]
    ) -> None:
        """Waves of ``--wave-size`` unique mixed prompts every 2 s for the phase's minutes."""
        size, book = self.args.wave_size, self.book
        try:
            with Client(self.redis_server.url) as client:
                started, wave = time.monotonic(), 0
                while (due := started + 2.0 * wave) < started + phase.minutes * 60:
                    if stop.wait(max(0.0, due - time.monotonic())):
                        return
                    tags = [t for t, share in TAGS.items() for _ in range(round(share * size))]
                    tags += [""] * (size - len(tags))
                    rng.shuffle(tags)
                    for number, tag in enumerate(tags):
                        prompt = f"soak {phase.name} wave {wave:04d} #{number:02d} {self.nonce}"
                        prompt += f" {tag}" if tag else ""
                        key = f"soak-{self.nonce}-{phase.name}-{wave}-{number}"
                        while True:
                            try:
                                job = client.submit(prompt, idempotency_key=key)
                                break
                            except BrokerUnavailable:  # Redis is down: the same key again
                                retries = book.submit_retries.get(phase.name, 0)
                                book.submit_retries[phase.name] = retries + 1
                                if stop.wait(0.2):
                                    return
                        book.add(Tracked(job.id, prompt, phase.name, time.monotonic()))
                    wave += 1
        except BaseException as exc:
            errors.append(exc)

    def collector(self, stop: threading.Event) -> None:
        """Polls the unfinished jobs (500 a round trip) until ``stop``, settling the finished."""
        book = self.book
        with Client(self.redis_server.url) as client:
            while not stop.wait(0.25):
                with book.changed:
                    pending = sorted(book.pending)
                for start in range(0, len(pending), 500):
                    chunk = [client.job(job_id) for job_id in pending[start : start + 500]]
                    try:
                        finished = client.poll(chunk)
                    except BrokerUnavailable:
                        break
                    except JobNotFound as exc:  # neither its state nor its result is in Redis
                        book.settle(exc.job_id, "missing")
                        continue
                    for job in finished:
                        try:
                            job.result()
                            book.settle(job.id, "succeeded")
                        except JobFailed as exc:
                            book.settle(job.id, exc.kind)

    def chaos_plan(self, length_s: float) -> list[tuple[float, str]]:
        """A worker kill every 10-20 s; the Redis kills spread evenly over the phase."""
        rng, plan = self.rng, []
        at = rng.uniform(10, 20)
        while at < length_s:
            plan.append((at, "worker"))
            at += rng.uniform(10, 20)
        restarts = self.args.redis_restarts
        for k in range(1, restarts + 1):
            plan.append((length_s * k / (restarts + 1) + rng.uniform(-5, 5), "redis"))
        return sorted(plan)

    def run_phase(self, phase: Phase, faults: bool) -> None:
        """The waves for the phase's minutes (with the kills when ``faults``), then the drain."""
        stop, errors = threading.Event(), list[BaseException]()
        started, phase.started_wall = time.monotonic(), time.time()
        agent_rng = random.Random(self.rng.random())
        thread = threading.Thread(
            target=self.agent, args=(phase, agent_rng, stop, errors), daemon=True
        )
        thread.start()
        length_s = phase.minutes * 60
        try:
            for at, what in self.chaos_plan(length_s) if faults else []:
                if stop.wait(max(0.0, started + at - time.monotonic())) or errors:
                    break
                if what == "worker":
                    kill = self.fleet.kill_random(self.rng, GROUP_SHARE, CHILD_SHARE)
                    phase.kills.append(kill)
                    now = time.monotonic() - started
                    say(f"{now:6.1f} s  SIGKILL {kill.kind} {kill.label} {sorted(kill.since)}")
                else:
                    down_s = self.rng.uniform(*REDIS_DOWN_S)
                    phase.redis_restarts.append(time.time())
                    self.redis_server.kill()
                    now = time.monotonic() - started
                    say(f"{now:6.1f} s  SIGKILL redis-server, down for {down_s:.1f} s")
                    time.sleep(down_s)  # the outage is the scenario
                    self.redis_server.start()
            thread.join(timeout=length_s + 120)
        finally:
            stop.set()
        if errors:
            raise errors[0]
        phase.waves_end = time.monotonic()
        self.fleet.wait_ready()
        self.drain(phase)

    def drain(self, phase: Phase) -> None:
        """Wait (at most --drain-s) until every job of the phase has ended."""
        book = self.book
        say(f"{phase.name}: waves done ({len(book.of(phase.name))} jobs); draining")
        deadline = time.monotonic() + self.args.drain_s
        with book.changed:
            while any(book.jobs[j].phase == phase.name for j in book.pending):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                book.changed.wait(left)
        say(f"{phase.name}: drained in {time.monotonic() - phase.waves_end:.1f} s")


def say(text: str) -> None:
    print(text, flush=True)


def mutex_ttl_s(client: redis.Redis) -> float | None:
    """How long kombu's restore lock (taken to move messages unacknowledged past the
    visibility timeout back to the queue) is still held; None when it is free."""
    left = int(client.pttl("unacked_mutex"))
    return left / 1000 if left > 0 else None


def recovery(client: redis.Redis) -> dict[str, int | None]:
    found = {text_of(k): v for k, v in client.hgetall(RECOVERY_KEY).items()}
    return {name: int(found[name]) if name in found else None for name in RECOVERY_FIELDS}


def check_checkout() -> dict[str, str]:
    """The environment the workers get; fails unless they and this process import this
    checkout's worker package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_", "OPENAI"))}
    env["PYTHONPATH"] = str(ROOT)
    probe = [sys.executable, "-c", "import worker; print(worker.__file__)"]
    seen = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    for where in (worker.__file__, seen.stdout.strip()):
        if not Path(where).resolve().is_relative_to(ROOT):
            raise SystemExit(f"worker imported from {where}, not {ROOT}: set PYTHONPATH={ROOT}")
    return env


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="of waves with faults")
    parser.add_argument("--clean-minutes", type=float, default=1.0, help="of waves, no faults")
    parser.add_argument("--drain-s", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep logs and data here")
    parser.add_argument("--wave-size", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--redis-restarts", type=int, default=2)
    return parser.parse_args()


def run(args: argparse.Namespace, work: Path) -> Report:
    """Start everything, run both phases, read the figures, stop everything."""
    canary = f"sk-canary-{uuid.uuid4().hex}"
    env = check_checkout()
    provider = TagProvider(canary).start()
    redis_server = AofRedis(work / "redis")
    fleet = Fleet(env, ROOT, work, args.concurrency)
    stop_collector = threading.Event()
    store = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    try:
        redis_server.start()
        env |= {"PROMPTQ_REDIS_URL": redis_server.url, "LLM_API_KEY": canary}
        env |= {"LLM_MODEL": MODEL, "LLM_BASE_URL": provider.base_url, **SETTINGS}
        for processes in (1, 1, 1, 2):
            fleet.start(processes)
        fleet.wait_ready()
        soak = Soak(args, redis_server, fleet, Book())
        threading.Thread(target=soak.collector, args=(stop_collector,), daemon=True).start()
        phases = [Phase("clean", args.clean_minutes), Phase("chaos", args.minutes)]
        for phase in phases:
            if phase.minutes > 0:
                say(f"{phase.name}: {phase.minutes:g} min of waves")
                soak.run_phase(phase, faults=phase.name == "chaos")
        stop_collector.set()
        events = read_events(sorted(work.glob("worker-*.log")))
        reports: dict[str, PhaseReport | None] = {}
        for phase in phases:
            left = sorted(j.job_id for j in soak.book.of(phase.name) if j.finished is None)
            reports[phase.name] = None
            if phase.minutes > 0:
                jobs = soak.book.of(phase.name)
                reports[phase.name] = phase_report(
                    phase,
                    jobs=jobs,
                    submit_retries=soak.book.submit_retries.get(phase.name, 0),
                    calls={j.job_id: provider.calls_of(j.prompt) for j in jobs},
                    retries=int(SETTINGS["LLM_NUM_RETRIES"]),
                    events=events,
                    stranded=where_is(store, left),
                )
        logs = b"".join(p.read_bytes() for p in work.glob("worker-*.log"))
        aof = b"".join(p.read_bytes() for p in (work / "redis").rglob("*") if p.is_file())
        return Report(
            faults=reports["chaos"],
            fault_free=reports["clean"],
            recovery=recovery(store),
            unacked_mutex_ttl_s=mutex_ttl_s(store),
            canary_leaked=canary.encode() in dump_values(store) + logs + aof,
            canary_calls=provider.with_key,
            prompts_in_logs=logs.count(b"soak clean wave") + logs.count(b"soak chaos wave"),
            seed=args.seed,
            settings=SETTINGS,
            logs=str(work),
        )
    finally:
        stop_collector.set()
        fleet.stop()
        store.close()
        redis_server.stop()
        provider.stop()


def main() -> int:
    args = parse_args()

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # the cleanup in run() stops every process

    signal.signal(signal.SIGTERM, on_term)
    work = args.logs or Path(tempfile.mkdtemp(prefix="promptq-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"soak: seed {args.seed}, logs and data in {work}")
    report = run(args, work)
    show(report)
    if args.json:
        figures = asdict(report) | {"throughput_ratio": report.throughput_ratio}
        args.json.write_text(json.dumps(figures, indent=2))
    failed = report.stranded > 0 or report.canary_leaked or not report.canary_calls
    if failed or args.logs is not None:
        say(f"logs and data kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
