"""The Celery app and its configuration for an LLM queue."""

from __future__ import annotations

import functools
import logging
import sys
from functools import cached_property
from typing import Any

import redis
from celery import Celery, bootsteps
from kombu.entity import Exchange, Queue

from api_client._constants import QUEUE
from api_client._schemas import ErrorKind
from worker.app.canvas import relay_app
from worker.app.queue_guard import transport_for
from worker.app.tasks import register
from worker.attempt.runtime import Runtime
from worker.errors import EXIT_USAGE, MetricsPortTaken
from worker.fleet.custody import Heartbeat, this_process
from worker.fleet.deadlines import DeadlineSweep
from worker.fleet.parking import ParkingMover
from worker.fleet.reconcile import Reconciler
from worker.llm.call import warm_up
from worker.ops.metrics import MetricsServer, ScheduleCollector
from worker.ops.schedule_status import read_schedule
from worker.settings import Settings

logger = logging.getLogger("promptq.worker")


class PromptqCelery(Celery):  # type: ignore[misc]  # Celery is untyped
    """A Celery app that carries the worker's settings, its Runtime (what attempts use) and the
    process's services (heartbeat, safety net, parking mover).

    Everything is created lazily, so each process (after a fork) makes its own connections.
    Settings stay out of ``app.conf``: Celery can print its conf, and the key must not leak.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__("promptq", set_as_current=False)
        self.settings = settings
        self.conf.update(celery_config(settings))
        # What `promptq worker` exits with (worker_main gives back no status of its own).
        self.exit_status = 0

    @cached_property
    def runtime(self) -> Runtime:
        return Runtime(self.settings)

    @cached_property
    def relay(self) -> Celery:
        """The app that sends the callbacks of jobs other Celery apps sent (worker.app.canvas)."""
        return relay_app(self.settings)

    @cached_property
    def parking_mover(self) -> ParkingMover:
        runtime = self.runtime
        sweep = DeadlineSweep(runtime.redis, ttl_s=self.settings.queue.result_ttl_s)
        expired = functools.partial(runtime.metrics.job_failed, ErrorKind.DEADLINE_EXCEEDED)
        return ParkingMover(runtime.parking, sweep=sweep, on_expired=expired)

    @cached_property
    def heartbeat(self) -> Heartbeat:
        """This process's heartbeat, which also returns dead processes' messages to the queue."""
        return Heartbeat(
            self.runtime.redis,
            this_process(),
            self.settings.queue.heartbeat_timeout_s,
            on_returned=self.runtime.metrics.messages_returned.inc,
        )

    @cached_property
    def reconciler(self) -> Reconciler:
        """The safety net's passes, for jobs whose message was lost anyway."""
        return Reconciler(
            self.runtime.redis,
            self.runtime.store,
            self.settings.queue.reconcile_interval_s,
            on_recovered=self.runtime.metrics.recovered,
        )


# Messages with an ETA (a countdown) one worker holds in memory at most, besides its calls in
# flight: only messages from elsewhere (an older promptq, a plain Celery client) carry one.
FOREIGN_ETA_LIMIT = 1000


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings for long, slow, paid calls that must not be lost or run twice."""
    queue = settings.queue
    return {
        "broker_url": queue.broker_url,
        # Queue entries that are not promptq jobs are dropped and logged without their bodies
        # (which hold prompts), and cannot stop the worker: see worker.app.queue_guard.
        "broker_transport": transport_for(queue.broker_url),
        "worker_consumer": "worker.app.queue_guard:GuardedConsumer",
        # Outcomes go to promptq's own keys (worker.fleet.store), where a terminal result cannot be
        # overwritten by a late RETRY; Celery's own result backend stays off.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # The queue hangs off the default (anonymous) exchange, as the client publishes it:
        # a retry's re-publish then goes straight to the queue's list and never depends on
        # kombu's binding keys, which a Redis restart or flush can lose (the message would go
        # to kombu's dead-letter list unseen).
        "task_queues": [Queue(QUEUE, Exchange(""), routing_key=QUEUE)],  # type: ignore[no-untyped-call]
        "task_default_queue": QUEUE,
        "task_default_exchange": "",
        "task_default_routing_key": QUEUE,
        # Acknowledge after the call: a killed worker's job returns after the visibility timeout.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # promptq's own messages carry no ETA (a job waits parked in Redis: worker.attempt.later),
        # but Celery would hold any message that does in memory until due: bound how many.
        # Celery applies the limit to every message the worker holds, calls in flight
        # included (it caps the prefetch count): the limit comes on top of the concurrency.
        "worker_eta_task_limit": queue.concurrency + FOREIGN_ETA_LIMIT,
        "broker_transport_options": {
            "visibility_timeout": queue.visibility_timeout_s,
            # kombu looks for messages unacknowledged past the visibility timeout (a killed
            # worker's jobs) only every 10 s x 10 by default: they came back up to 100 s late.
            # Every worker now looks every tenth of the timeout (0.1 s to 10 s).
            "unacked_restore_interval": restore_interval_s(queue.visibility_timeout_s),
            "unacked_restore_throttle": 1,
            # The lock one worker takes for that look expires after 5 minutes by default: a
            # worker killed holding it, or a Redis restart that kept it (AOF), stopped every
            # return for that long (seen in a chaos soak). A look takes milliseconds.
            "unacked_mutex_expire": max(1, round(restore_interval_s(queue.visibility_timeout_s))),
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "socket_keepalive": True,
            "health_check_interval": 30,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
    }


def with_concurrency(settings: Settings, concurrency: int | None) -> Settings:
    """The settings with the concurrency a command line chose (None or 0: as configured)."""
    if not concurrency:
        return settings
    queue = settings.queue.model_copy(update={"concurrency": concurrency})
    return settings.model_copy(update={"queue": queue})


def restore_interval_s(visibility_timeout_s: float) -> float:
    """How often each worker returns messages unacknowledged past the visibility timeout to the
    queue: a killed worker's jobs come back at most a tenth of the timeout late (10 s at most)."""
    return max(0.1, min(10.0, visibility_timeout_s / 10))


class WarmUpStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Warms LiteLLM up on the worker's event loop before the first job arrives."""

    label = "promptq warm-up"

    def start(self, worker: Any) -> None:
        worker.app.runtime.call_loop.run([warm_up()])


class ParkingStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Writes this worker's tenant weights for the fleet's scheduler (and moves jobs an older
    promptq queued into its structure), and runs the app's ParkingMover for as long as the
    worker runs."""

    label = "promptq parking"

    def start(self, worker: Any) -> None:
        runtime = worker.app.runtime
        try:
            runtime.scheduler.publish_weights(runtime.settings.tenants)
            if adopted := runtime.scheduler.adopt_older_lines():
                logger.info("%d job(s) an older promptq queued moved into the scheduler", adopted)
        except redis.RedisError as exc:
            logger.warning("cannot write the tenants' weights yet (others' stand): %s", exc)
        worker.app.parking_mover.start()

    def stop(self, worker: Any) -> None:
        worker.app.parking_mover.stop()


MIN_REDIS_VERSION = (6, 2)  # BLMOVE, which takes a message into a worker's custody


def redis_version_problem(client: redis.Redis) -> str | None:
    """Why this Redis cannot serve as promptq's broker, or None (also when it cannot be
    reached yet: the worker waits for it)."""
    try:
        version = str(client.info("server").get("redis_version", ""))
    except redis.RedisError:
        return None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if len(parts) == 2 and parts < MIN_REDIS_VERSION:
        return (
            f"Redis {version} is too old: promptq needs Redis 6.2 or newer (BLMOVE, to take "
            "messages without losing them to a killed worker)"
        )
    return None


class CustodyStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Starts this process's heartbeat before the consumer takes any message (it beats until
    the process exits), and the safety net's passes for as long as the worker runs."""

    label = "promptq custody"

    def start(self, worker: Any) -> None:
        app: PromptqCelery = worker.app
        problem = redis_version_problem(app.runtime.redis)
        if problem is not None:
            print(f"promptq worker: {problem}", file=sys.__stderr__, flush=True)
            app.exit_status = EXIT_USAGE
            raise SystemExit(EXIT_USAGE)
        app.heartbeat.start()
        app.reconciler.start()

    def stop(self, worker: Any) -> None:
        worker.app.reconciler.stop()


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Serves the app's metrics over HTTP for as long as the worker runs, when
    PROMPTQ_METRICS_PORT is set; a port that cannot be had stops the worker (exit status 2)."""

    label = "promptq metrics"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.server: MetricsServer | None = None

    def start(self, worker: Any) -> None:
        app: PromptqCelery = worker.app
        queue = app.settings.queue
        if queue.metrics_port is None:
            return
        registry = app.runtime.metrics.registry
        client = app.runtime.redis
        registry.register(ScheduleCollector(lambda: read_schedule(client, max_parked=10_000)))
        self.server = MetricsServer(registry, queue.metrics_host, queue.metrics_port)
        try:
            self.server.start()
        except MetricsPortTaken as exc:
            self.server = None
            # Celery has put a logger in place of sys.stderr by now: write to the real one, as
            # a bad setting is reported (worker.cli.worker_command), then exit with status 2.
            print(f"promptq worker: {exc}", file=sys.__stderr__, flush=True)
            app.exit_status = EXIT_USAGE
            raise SystemExit(EXIT_USAGE) from None

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def create_app(settings: Settings) -> PromptqCelery:
    """A Celery app for these settings with the promptq task registered."""
    app = PromptqCelery(settings)
    register(app)
    app.steps["worker"].add(CustodyStep)
    app.steps["worker"].add(WarmUpStep)
    app.steps["worker"].add(ParkingStep)
    app.steps["worker"].add(MetricsStep)
    return app
