"""What benchmarks/soak.py reports: each phase's figures, from its jobs, the provider's call
counts and the workers' logs, and the table it prints."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from _soak_parts import Event, Kill, held_at_kills, in_flight_at


@dataclass
class Tracked:
    """One submitted job, as the soak follows it."""

    job_id: str
    prompt: str
    phase: str
    submitted: float  # monotonic, when the submit was accepted
    finished: float | None = None  # monotonic, when a poll first saw it terminal
    finished_wall: float | None = None  # the same, wall-clock time (to compare with logs)
    outcome: str | None = None  # "succeeded", a failure kind, or "missing" (no key at all)


@dataclass
class Phase:
    name: str
    minutes: float
    started_wall: float = 0.0  # wall-clock time the waves began
    waves_end: float = 0.0  # monotonic, when the last wave was submitted
    kills: list[Kill] = field(default_factory=list)
    redis_restarts: list[float] = field(default_factory=list)  # wall-clock times of the kills


@dataclass
class Spread:
    median: float | None = None
    p95: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        values = sorted(values)
        if not values:
            return cls()
        return cls(statistics.median(values), values[int(len(values) * 0.95)], values[-1])

    def __str__(self) -> str:
        if self.median is None or self.p95 is None or self.max is None:
            return "-"
        return f"{self.median:.1f}/{self.p95:.1f}/{self.max:.1f}"


@dataclass
class PhaseReport:
    minutes: float
    jobs_submitted: int
    submit_retries_redis_down: int
    kills_single: int
    kills_child: int
    kills_group: int
    redis_restarts: int
    jobs_succeeded: int
    jobs_failed_by_kind: dict[str, int]
    jobs_stranded: int
    stranded_by_place: dict[str, int]  # where their message is: nowhere, queue, unacked, parked
    stranded: list[dict[str, Any]]  # up to 20: id, state, starts, in, held_at_kills
    throughput_in_waves_per_s: float
    throughput_overall_per_s: float
    latency_s: Spread
    worst_calls: int
    worst_calls_job: str | None
    worst_calls_bound: int
    jobs_over_bound: int
    over_bound: list[str]
    jobs_held_at_kills: int
    kill_to_received_again_s: Spread
    held_never_received_again: int
    kills: list[dict[str, Any]]  # each: seconds into the phase, kind, worker, jobs it held
    redis_restarts_at_s: list[float]


def phase_report(
    phase: Phase,
    *,
    jobs: list[Tracked],
    submit_retries: int,
    calls: dict[str, int],
    retries: int,
    events: list[Event],
    stranded: dict[str, dict[str, Any]],
) -> PhaseReport:
    """``calls``: provider calls per job id; ``stranded``: where_is() of the unfinished jobs."""
    first = min((j.submitted for j in jobs), default=0.0)
    ended = [(j, j.finished) for j in jobs if j.finished is not None]
    last = max((at for _, at in ended), default=first)
    kinds: dict[str, int] = {}
    for job in jobs:
        if job.outcome not in (None, "succeeded", "missing"):
            kinds[str(job.outcome)] = kinds.get(str(job.outcome), 0) + 1
    ended_at = {j.job_id: j.finished_wall for j in jobs if j.finished_wall is not None}
    figures = held_at_kills(phase.kills, events, ended_at)
    # A job's redeliveries: the kills that took it from the process holding it, plus the Redis
    # restarts it was in flight through (a worker cut off from Redis cannot acknowledge).
    redelivered = dict.fromkeys((j.job_id for j in jobs), 0)
    for held in figures.held:
        for job_id in held:
            redelivered[job_id] = redelivered.get(job_id, 0) + 1
    for at in phase.redis_restarts:
        for job_id in in_flight_at(at, events, phase.kills, ended_at) & redelivered.keys():
            redelivered[job_id] += 1
    over = [i for i, n in calls.items() if n > 1 + retries + redelivered[i]]
    worst = max(calls, key=lambda i: (calls[i] - redelivered[i], calls[i]), default=None)
    kinds_of_kills = [k.kind for k in phase.kills]
    places: dict[str, int] = {}
    for where in stranded.values():
        place = ",".join(where["in"]) or "nowhere"
        places[place] = places.get(place, 0) + 1
    shown = sorted(stranded.items(), key=lambda item: (bool(item[1]["in"]), item[0]))[:20]
    wall_start = phase.started_wall
    return PhaseReport(
        minutes=phase.minutes,
        jobs_submitted=len(jobs),
        submit_retries_redis_down=submit_retries,
        kills_single=kinds_of_kills.count("single"),
        kills_child=kinds_of_kills.count("child"),
        kills_group=kinds_of_kills.count("group"),
        redis_restarts=len(phase.redis_restarts),
        jobs_succeeded=sum(1 for j in jobs if j.outcome == "succeeded"),
        jobs_failed_by_kind=kinds,
        jobs_stranded=len(stranded),
        stranded_by_place=places,
        stranded=[
            {"job_id": i, **where, "held_at_kills": sum(i in h for h in figures.held)}
            for i, where in shown
        ],
        throughput_in_waves_per_s=sum(at <= phase.waves_end for _, at in ended)
        / max(1e-9, phase.waves_end - first),
        throughput_overall_per_s=len(ended) / max(1e-9, last - first),
        latency_s=Spread.of([at - j.submitted for j, at in ended]),
        worst_calls=calls[worst] if worst else 0,
        worst_calls_job=worst,
        worst_calls_bound=1 + retries + (redelivered[worst] if worst else 0),
        jobs_over_bound=len(over),
        over_bound=over[:20],
        jobs_held_at_kills=sum(len(h) for h in figures.held),
        kill_to_received_again_s=Spread.of(figures.back_after_s),
        held_never_received_again=len(figures.never_back),
        kills=[
            {
                "at_s": round(k.at - wall_start, 1),
                "kind": k.kind,
                "worker": k.label,
                "held": len(held),
            }
            for k, held in zip(phase.kills, figures.held, strict=True)
        ],
        redis_restarts_at_s=[round(at - wall_start, 1) for at in phase.redis_restarts],
    )


@dataclass
class Report:
    faults: PhaseReport | None
    fault_free: PhaseReport | None
    recovery: dict[str, int | None]  # promptq:recovery's fields; None: absent
    unacked_mutex_ttl_s: float | None  # kombu's restore lock, if held when the drain ended
    canary_leaked: bool  # in a Redis key or value, a worker log or the AOF files
    canary_calls: int  # provider calls that carried the canary key (> 0: it was used)
    prompts_in_logs: int
    seed: int
    settings: dict[str, str]
    logs: str

    @property
    def throughput_ratio(self) -> float | None:
        if self.faults is None or self.fault_free is None:
            return None
        clean = self.fault_free.throughput_in_waves_per_s
        return self.faults.throughput_in_waves_per_s / clean if clean else None

    @property
    def stranded(self) -> int:
        return sum(p.jobs_stranded for p in (self.faults, self.fault_free) if p is not None)


ROWS = [  # label, PhaseReport field
    ("minutes of waves", "minutes"),
    ("jobs submitted", "jobs_submitted"),
    ("submits retried while Redis was down", "submit_retries_redis_down"),
    ("worker kills: single worker", "kills_single"),
    ("worker kills: one process of a group", "kills_child"),
    ("worker kills: whole --processes 2 group", "kills_group"),
    ("Redis SIGKILLs + restarts (AOF)", "redis_restarts"),
    ("jobs succeeded", "jobs_succeeded"),
    ("jobs failed, by kind", "jobs_failed_by_kind"),
    ("JOBS STRANDED (not terminal after the drain)", "jobs_stranded"),
    ("  by where their message is", "stranded_by_place"),
    ("throughput while submitting, jobs/s", "throughput_in_waves_per_s"),
    ("throughput to the last outcome, jobs/s", "throughput_overall_per_s"),
    ("job latency s (median/p95/max)", "latency_s"),
    ("worst provider calls per job", "worst_calls"),
    ("  its bound 1 + retries + redeliveries", "worst_calls_bound"),
    ("jobs over their bound", "jobs_over_bound"),
    ("jobs held by killed workers", "jobs_held_at_kills"),
    ("kill -> held job received again s (med/p95/max)", "kill_to_received_again_s"),
    ("held jobs never received again", "held_never_received_again"),
]


def _cell(phase: PhaseReport | None, name: str) -> str:
    if phase is None:
        return "-"
    value = getattr(phase, name)
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "0"
    return str(value)


def show(report: Report) -> None:
    def line(label: str, *cells: object) -> None:
        print(f"  {label:<48}" + "".join(f"{c!s:>15}" for c in cells))

    print()
    line("", "with faults", "fault-free")
    for label, name in ROWS:
        line(label, _cell(report.faults, name), _cell(report.fault_free, name))
    ratio = report.throughput_ratio
    line("throughput with / without faults", "-" if ratio is None else f"{ratio:.2f}")
    for name, value in report.recovery.items():
        line(f"safety net: promptq:recovery {name}", "absent" if value is None else value)
    mutex = report.unacked_mutex_ttl_s
    line("kombu unacked_mutex held at the end", "no" if mutex is None else f"{mutex:.0f} s left")
    line("canary API key leaked", "YES" if report.canary_leaked else "no")
    line("provider calls that carried the canary key", report.canary_calls)
    line("prompts written in worker logs", report.prompts_in_logs)
    for title, phase in (("with faults", report.faults), ("fault-free", report.fault_free)):
        if phase is not None and phase.stranded:
            print(f"\n  stranded {title} ({len(phase.stranded)} shown): "
                  "job, promptq:state, starts, message in, kills that held it")  # fmt: skip
            for s in phase.stranded:
                where = ",".join(s["in"]) or "nowhere"
                print(f"    {s['job_id']}  {s['state']}  {s['starts']}  {where}  "
                      f"{s['held_at_kills']}")  # fmt: skip
