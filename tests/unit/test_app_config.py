"""The Celery configuration the worker runs with."""

from __future__ import annotations

import pytest

from worker.app.celery_app import (
    FOREIGN_ETA_LIMIT,
    celery_config,
    redis_version_problem,
    restore_interval_s,
    with_concurrency,
)
from worker.settings import load_settings


@pytest.mark.parametrize(
    ("visibility_timeout_s", "interval_s"), [(3600, 10.0), (60, 6.0), (5, 0.5), (0.2, 0.1)]
)
def test_lost_jobs_are_looked_for_every_tenth_of_the_visibility_timeout(
    visibility_timeout_s: float, interval_s: float
) -> None:
    assert restore_interval_s(visibility_timeout_s) == pytest.approx(interval_s)


def test_every_restore_sweep_scans_redis() -> None:
    settings = load_settings(queue={"visibility_timeout_s": 900})
    options = celery_config(settings)["broker_transport_options"]

    assert isinstance(options, dict)
    assert options["visibility_timeout"] == 900
    assert options["unacked_restore_interval"] == pytest.approx(10.0)
    # kombu's default scans on one sweep in 10 only: lost jobs came back up to 100 s late.
    assert options["unacked_restore_throttle"] == 1
    # kombu's default lock on the sweep lasts 5 minutes: one kept by a dead worker (or a
    # Redis restart) stopped every sweep for that long.
    assert options["unacked_mutex_expire"] == 10


def test_messages_with_an_eta_are_bounded_on_top_of_the_calls_in_flight() -> None:
    # promptq parks its retries in Redis; a message that carries an ETA anyway (an older
    # promptq's retry, a plain Celery client's countdown) is held in memory until due. Celery
    # caps every message a worker holds (its prefetch count) at worker_eta_task_limit: the
    # bound comes on top of the concurrency, so held messages never take a thread's place.
    settings = load_settings(queue={"concurrency": 4})

    assert celery_config(settings)["worker_eta_task_limit"] == 4 + FOREIGN_ETA_LIMIT
    assert celery_config(with_concurrency(settings, 16))["worker_eta_task_limit"] == (
        16 + FOREIGN_ETA_LIMIT
    )
    assert with_concurrency(settings, None) is settings


@pytest.mark.parametrize(
    ("version", "refused"), [("5.0.7", True), ("6.0.16", True), ("6.2.0", False), ("7.0.15", False)]
)
def test_a_redis_without_blmove_is_refused_by_name(version: str, refused: bool) -> None:
    class FakeInfo:
        def info(self, section: str) -> dict[str, str]:
            return {"redis_version": version}

    problem = redis_version_problem(FakeInfo())  # type: ignore[arg-type]

    assert (problem is not None) is refused
    if problem is not None:
        assert version in problem and "6.2" in problem
