"""What `promptq status` shows of the scheduler: per lane, jobs waiting and parked by priority
and tenant, and each tenant's share of the last minute (and, for metrics, jobs ended early)."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from api_client._constants import CONTROL_KEY, PARKED_KEY
from api_client._polling import text_of
from api_client._schedule import LANE_NAMES_KEY, LANES_KEY, SERVED_PREFIX, WAITING_KEY
from api_client._schemas import PRIORITY_ORDER
from worker.fleet.parking import routed_member
from worker.fleet.scripts import redis_now_ms

SCAN_COUNT = 1000


@dataclass
class LaneStatus:
    """One lane: what it calls, and its jobs by priority, then tenant."""

    name: str
    opens_in_s: float = 0.0  # > 0: closed for its rate limit this much longer
    waiting: dict[str, dict[str, int]] = field(default_factory=dict)
    parked: dict[str, dict[str, int]] = field(default_factory=dict)  # retries and hand-backs
    served_last_minute: dict[str, int] = field(default_factory=dict)  # jobs taken, by tenant


@dataclass
class ScheduleStatus:
    lanes: list[LaneStatus] = field(default_factory=list)
    ended: dict[str, int] = field(default_factory=dict)  # cancelled, deadline_exceeded


def read_schedule(client: redis.Redis, max_parked: int = 100_000) -> ScheduleStatus:
    """The scheduler's figures (reads at most ``max_parked`` parked entries)."""
    names = {text_of(k): text_of(v) for k, v in client.hgetall(LANE_NAMES_KEY).items()}
    lanes: dict[str, LaneStatus] = {}

    def lane(lane_id: str) -> LaneStatus:
        if lane_id not in lanes:
            lanes[lane_id] = LaneStatus(names.get(lane_id, lane_id))
        return lanes[lane_id]

    now_ms = redis_now_ms(client)
    for field_name, jobs in client.hgetall(WAITING_KEY).items():
        lane_id, rank, tenant = text_of(field_name).split("|", 2)
        _add(lane(lane_id).waiting, _priority(rank), tenant, int(jobs))
    opening: list[tuple[bytes, float]] = client.zrange(LANES_KEY, 0, -1, withscores=True)  # type: ignore[assignment]
    for raw_lane, opens_at in opening:
        lane(text_of(raw_lane)).opens_in_s = max(0.0, (opens_at - now_ms) / 1000)
    for count, (member, _score) in enumerate(client.zscan_iter(PARKED_KEY, count=SCAN_COUNT)):
        if count >= max_parked:
            break
        routed = routed_member(member)
        if routed is not None:
            _add(lane(routed.lane).parked, _priority(routed.rank), routed.tenant, routed.cost)
    minute = now_ms // 60_000
    for key in (f"{SERVED_PREFIX}{minute - 1}", f"{SERVED_PREFIX}{minute}"):
        for field_name, jobs in client.hgetall(key).items():
            lane_id, tenant = text_of(field_name).split("|", 1)
            served = lane(lane_id).served_last_minute
            served[tenant] = served.get(tenant, 0) + int(jobs)
    ended = {text_of(k): int(v) for k, v in client.hgetall(CONTROL_KEY).items()}
    return ScheduleStatus(sorted(lanes.values(), key=lambda s: s.name), ended)


def _priority(rank: str | int) -> str:
    return PRIORITY_ORDER[int(rank)].value


def _add(table: dict[str, dict[str, int]], priority: str, tenant: str, jobs: int) -> None:
    tenants = table.setdefault(priority, {})
    tenants[tenant] = tenants.get(tenant, 0) + jobs


def schedule_lines(status: ScheduleStatus) -> list[tuple[str, str]]:
    """`promptq status` lines: one per lane with jobs waiting, parked or served."""
    lines = []
    for lane in status.lanes:
        parts = [f"waiting {_by_priority(lane.waiting)}"]
        if lane.parked:
            parts.append(f"parked {_by_priority(lane.parked)}")
        if lane.served_last_minute:
            total = sum(lane.served_last_minute.values())
            shares = ", ".join(
                f"{tenant} {jobs / total:.0%}"
                for tenant, jobs in sorted(lane.served_last_minute.items())
            )
            parts.append(f"last minute {total:,} taken ({shares})")
        if lane.opens_in_s > 0:
            parts.append(f"closed {lane.opens_in_s:.1f} s more (rate limit)")
        lines.append((f"lane {lane.name}", "; ".join(parts)))
    return lines


def _by_priority(table: dict[str, dict[str, int]]) -> str:
    if not table:
        return "none"
    order = [p.value for p in PRIORITY_ORDER]
    return ", ".join(
        f"{priority} {sum(tenants.values()):,} ("
        + ", ".join(f"{t} {n:,}" for t, n in sorted(tenants.items()))
        + ")"
        for priority, tenants in sorted(table.items(), key=lambda item: order.index(item[0]))
    )
