"""Every Prometheus metric a worker exports, and the HTTP server that exposes them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from api_client._schemas import ErrorKind, Usage
from worker.errors import MetricsPortTaken
from worker.ops.schedule_status import ScheduleStatus

logger = logging.getLogger("promptq.worker")

# LLM calls take from a fraction of a second (short replies) to minutes (long generations,
# LLM_TIMEOUT is 300 s by default).
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# A request may name any model: past this many distinct names in one process, further ones
# are counted under OTHER_MODEL, so a client cannot grow the label set without bound.
MAX_MODELS = 100
OTHER_MODEL = "other"
# The same bound for tenants (a request may name any tenant).
MAX_TENANTS = 100
OTHER_TENANT = "other"

Wait = Literal["slept", "parked", "paused"]


class Metrics:
    """The worker's metrics, on their own registry (one per app, so tests never share one).

    Labels are the model (the deployment's model name) and the error kind: never keys,
    prompts or job ids.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._models: set[str] = set()
        self._tenants: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.jobs_started = Counter(
            "promptq_jobs_started",
            "Attempts of jobs started by this worker, by priority and tenant",
            ["priority", "tenant"],
            registry=r,
        )
        self.calls = Counter(
            "promptq_calls",
            "Provider calls made, by model and outcome (ok, or the error kind)",
            ["model", "outcome"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "promptq_call_duration_seconds",
            "Time one provider call took, failed calls included",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.rate_limited = Counter(
            "promptq_rate_limited",
            "Provider calls answered 429 (rate_limited)",
            ["model"],
            registry=r,
        )
        self.jobs_succeeded = Counter(
            "promptq_jobs_succeeded", "Jobs that ended with an answer", ["model"], registry=r
        )
        self.jobs_failed = Counter(
            "promptq_jobs_failed", "Jobs that ended failed, by error kind", ["kind"], registry=r
        )
        self.retries = Counter(
            "promptq_retries",
            "Retries scheduled after a transient failure, by model and error kind",
            ["model", "kind"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "promptq_budget_refusals",
            "Jobs refused before calling because a spending cap left no room (budget_exceeded)",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "promptq_prompt_tokens", "Prompt tokens of successful calls", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "promptq_completion_tokens", "Reply tokens of successful calls", ["model"], registry=r
        )
        self.spend_usd = Counter(
            "promptq_spend_usd", "What successful calls cost, in USD", ["model"], registry=r
        )
        self.limiter_waits = Counter(
            "promptq_limiter_waits",
            "Waits for a rate-limit slot: slept in the worker thread, or parked in Redis",
            ["model", "how"],
            registry=r,
        )
        self.limiter_wait_seconds = Counter(
            "promptq_limiter_wait_seconds",
            "Time jobs waited for a rate-limit slot, slept or parked",
            ["model", "how"],
            registry=r,
        )

        self.messages_returned = Counter(
            "promptq_messages_returned",
            "Messages of dead worker processes this process returned to the queue",
            registry=r,
        )
        self.jobs_recovered = Counter(
            "promptq_jobs_recovered",
            "Jobs the safety net found with no message anywhere and published again from "
            "their stored request (0 in a correct fleet)",
            registry=r,
        )
        self.jobs_abandoned = Counter(
            "promptq_jobs_abandoned",
            "Jobs the safety net found with no message anywhere and no stored request: "
            "failed as worker_lost",
            registry=r,
        )

    @contextmanager
    def timing(self, model: str) -> Iterator[None]:
        """Observe how long the block (one provider call) takes, whether it raises or not."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.call_seconds.labels(self._model(model)).observe(time.monotonic() - started)

    def call_succeeded(self, model: str, usage: Usage, cost_usd: float | None) -> None:
        """A call answered: its job succeeded with these tokens and this cost."""
        label = self._model(model)
        self.calls.labels(label, "ok").inc()
        self.prompt_tokens.labels(label).inc(usage.prompt_tokens)
        self.completion_tokens.labels(label).inc(usage.completion_tokens)
        if cost_usd:
            self.spend_usd.labels(label).inc(cost_usd)
        # Last, so that a scrape counting this job sees all of the above with it.
        self.jobs_succeeded.labels(label).inc()

    def call_failed(self, model: str, kind: ErrorKind) -> None:
        label = self._model(model)
        self.calls.labels(label, kind.value).inc()
        if kind is ErrorKind.RATE_LIMITED:
            self.rate_limited.labels(label).inc()

    def retry_scheduled(self, model: str, kind: ErrorKind) -> None:
        self.retries.labels(self._model(model), kind.value).inc()

    def job_failed(self, kind: ErrorKind, count: int = 1) -> None:
        self.jobs_failed.labels(kind.value).inc(count)

    def budget_refused(self, model: str) -> None:
        self.budget_refusals.labels(self._model(model)).inc()

    def recovered(self, how: str) -> None:
        """The safety net ended a job's wait: ``republished`` it, or ``abandoned`` it."""
        (self.jobs_recovered if how == "republished" else self.jobs_abandoned).inc()

    def limiter_waited(self, model: str, how: Wait, wait_s: float) -> None:
        label = self._model(model)
        self.limiter_waits.labels(label, how).inc()
        self.limiter_wait_seconds.labels(label, how).inc(max(0.0, wait_s))

    def job_started(self, priority: str, tenant: str) -> None:
        self.jobs_started.labels(
            priority, self._bounded(tenant, self._tenants, MAX_TENANTS, OTHER_TENANT)
        ).inc()

    def _model(self, model: str) -> str:
        return self._bounded(model, self._models, MAX_MODELS, OTHER_MODEL)

    def _bounded(self, value: str, seen: set[str], limit: int, other: str) -> str:
        with self._lock:
            if value in seen:
                return value
            if len(seen) < limit:
                seen.add(value)
                return value
        return other


class ScheduleCollector(Collector):
    """The fleet's scheduler, read from Redis at each scrape (every worker exports the same
    figures: aggregate them with max, not sum)."""

    def __init__(self, read: Callable[[], ScheduleStatus]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            status = self._read()
        except redis.RedisError:
            return
        labels = ["lane", "priority", "tenant"]
        waiting = GaugeMetricFamily(
            "promptq_jobs_waiting", "Jobs waiting to be taken", labels=labels
        )
        parked = GaugeMetricFamily("promptq_jobs_parked", "Jobs parked until due", labels=labels)
        served = GaugeMetricFamily(
            "promptq_jobs_taken_last_minute",
            "Jobs workers took in the last minute (up to two), by tenant",
            labels=["lane", "tenant"],
        )
        for lane in status.lanes:
            for family, table in ((waiting, lane.waiting), (parked, lane.parked)):
                for priority, tenants in table.items():
                    for tenant, jobs in tenants.items():
                        family.add_metric([lane.name, priority, tenant], jobs)
            for tenant, jobs in lane.served_last_minute.items():
                served.add_metric([lane.name, tenant], jobs)
        ended = GaugeMetricFamily(
            "promptq_jobs_ended_early",
            "Jobs ended before a call: cancelled, or past their deadline (fleet-wide counts)",
            labels=["how"],
        )
        for how in ("cancelled", "deadline_exceeded"):
            ended.add_metric([how], status.ended.get(how, 0))
        yield from (waiting, parked, served, ended)


class MetricsServer:
    """Serves a registry at http://HOST:PORT/metrics from a daemon thread (port 0: any free one)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("metrics server not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._httpd.server_port}/metrics"

    def start(self) -> str:
        """Listen and serve; return the URL. MetricsPortTaken when it cannot listen."""
        if self._httpd is None:
            try:
                self._httpd, self._thread = start_http_server(
                    self._port, self._host, registry=self._registry
                )
            except OSError as exc:
                raise MetricsPortTaken(
                    f"cannot serve metrics on {self._host}:{self._port} ({exc.strerror or exc}): "
                    "PROMPTQ_METRICS_PORT must be a free port (each worker process needs its "
                    "own) and PROMPTQ_METRICS_HOST an address of this machine; leave "
                    "PROMPTQ_METRICS_PORT unset for no metrics"
                ) from None
            logger.info("metrics at %s", self.url)
        return self.url

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
