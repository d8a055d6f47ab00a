"""What an attempt needs from its worker process: settings, the fleet's state in Redis, the loop."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import redis
import redis.asyncio

from worker.attempt.call_loop import CallLoop
from worker.attempt.retry import RetryPolicy
from worker.errors import NotConfigured
from worker.fleet.adoption import Adoption
from worker.fleet.limiter import Deployment, RateLimiter
from worker.fleet.parking import Parking
from worker.fleet.schedule import Scheduler
from worker.fleet.scripts import LoopRedis
from worker.fleet.spend import SpendLedger
from worker.fleet.store import JobStore
from worker.ops.metrics import Metrics
from worker.settings import LLMSettings, Settings

# Both of a worker process's Redis clients (blocking, and on the call loop) alike.
REDIS_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    "socket_timeout": 30,
    "health_check_interval": 30,
}


class Runtime:
    """One worker process's resources for its attempts, each made on first use (after a fork,
    so every process has its own connections). No Celery here: the Celery app holds one.

    ``Runtime(settings)`` against a Redis is all an attempt needs; tests build one directly.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._deployments: dict[tuple[str | None, str], Deployment] = {}
        self._retry_policies: dict[str | None, RetryPolicy] = {}

    @cached_property
    def redis(self) -> redis.Redis:
        """This process's connection pool to the broker's Redis (job keys, limiter state)."""
        return redis.Redis.from_url(self.settings.queue.broker_url, **REDIS_OPTIONS)

    @cached_property
    def loop_redis(self) -> LoopRedis:
        """The same Redis for the attempts on the call loop: runs the store's, the limiter's
        and the spend ledger's script calls without blocking the loop."""
        url = self.settings.queue.broker_url
        return LoopRedis(redis.asyncio.Redis.from_url(url, **REDIS_OPTIONS))

    @cached_property
    def store(self) -> JobStore:
        return JobStore(self.redis, ttl_s=self.settings.queue.result_ttl_s)

    @cached_property
    def limiter(self) -> RateLimiter:
        settings = self.settings
        return RateLimiter(
            self.redis,
            # Slots are reserved only as far ahead as a call waits for one in the worker:
            # a job that would wait longer waits in the scheduler, in order (throttle).
            max_ahead_s=settings.queue.limiter_max_sleep_s,
            adaptive=settings.queue.limiter_adaptive,
            start_rpm=settings.queue.limiter_start_rpm,
        )

    @cached_property
    def spend(self) -> SpendLedger:
        queue = self.settings.queue
        return SpendLedger(self.redis, max_usd=queue.max_spend_usd, period=queue.spend_period)

    @cached_property
    def adoption(self) -> Adoption:
        return Adoption(self.redis, ttl_s=self.settings.queue.result_ttl_s)

    @cached_property
    def scheduler(self) -> Scheduler:
        return Scheduler(self.redis)

    @cached_property
    def parking(self) -> Parking:
        return Parking(self.redis)

    @cached_property
    def call_loop(self) -> CallLoop:
        """The event loop every attempt runs on, PROMPTQ_CONCURRENCY at once."""
        return CallLoop(self.settings.queue.concurrency)

    @cached_property
    def metrics(self) -> Metrics:
        return Metrics()

    def llm_settings(self, name: str | None) -> LLMSettings:
        """Returns the LLM settings a job names (None: the default [llm]); raises
        NotConfigured when this worker has no [llm.NAME] of that name."""
        try:
            return self.settings.llm_named(name)
        except KeyError:
            raise NotConfigured(
                f"this worker has no [llm.{name}] configuration (it has: "
                f"{', '.join(sorted(self.settings.named_llms)) or 'none'})"
            ) from None

    def retry_policy(self, name: str | None) -> RetryPolicy:
        """Returns the backoff of the LLM settings a job names."""
        found = self._retry_policies.get(name)
        if found is None:
            named = self.settings.model_copy(update={"llm": self.llm_settings(name)})
            found = self._retry_policies[name] = RetryPolicy.from_settings(named)
        return found

    def deployment(self, model: str, name: str | None) -> Deployment:
        """Returns the rate-limited deployment a call to ``model`` with the LLM settings
        ``name`` goes to (its endpoint and key), with its limits."""
        found = self._deployments.get((name, model))
        if found is None:
            llm = self.llm_settings(name)
            limits = self.settings.limits_for(model, llm)
            key = llm.api_key.get_secret_value() if llm.api_key else None
            found = Deployment.of(
                model, llm.base_url, key, rpm=limits.rpm, tpm=limits.tpm, burst_s=limits.burst_s
            )
            self._deployments[(name, model)] = found
        return found

    @cached_property
    def secrets(self) -> tuple[str, ...]:
        """Every secret this worker holds (API keys, AWS keys), to scrub from error messages."""
        configs = [self.settings.llm, *self.settings.named_llms.values()]
        return tuple({secret for config in configs for secret in config.secrets()})

    def close(self) -> None:
        """Release what was made: the call loop's Redis clients, then the loop and its thread,
        then the blocking pool. For a process that goes on without this worker (embedded)."""
        made = self.__dict__
        if "loop_redis" in made:
            self.call_loop.run([self.loop_redis.close()])
        if "call_loop" in made:
            self.call_loop.stop()
        if "redis" in made:
            self.redis.close()
