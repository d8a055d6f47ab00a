"""An in-process promptq pipeline: real Redis and task code, no Celery worker, run step by step."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from api_client import Client
from api_client._constants import LIMITER_PREFIX, PARKED_KEY, QUEUE
from api_client._schedule import LANES_KEY, WAKE
from worker.app.tasks import deliveries_of
from worker.attempt.delivery import Delivery
from worker.attempt.jobs import run_jobs
from worker.attempt.runtime import Runtime
from worker.fleet.delivery_state import DeliveryState
from worker.fleet.parking import Moved, message_of_member
from worker.fleet.schedule import ready_messages
from worker.fleet.scripts import redis_now_ms
from worker.settings import load_settings

# The scaled-down settings of the end-to-end workers (tests/e2e/conftest.py: worker_env), with
# a longer call timeout: a test overrides any of them.
LLM_DEFAULTS: dict[str, Any] = {
    "model": "openai/test-model",
    "api_key": "sk-pipeline-test",
    "num_retries": 3,
    "retry_min_wait": 0.05,
    "retry_max_wait": 0.2,
    "retry_multiplier": 0.01,
    "timeout": 5,
}
# No slow start (the limiter's own tests turn it on): a test's first calls are not paced.
QUEUE_DEFAULTS: dict[str, Any] = {
    "visibility_timeout_s": 60,
    "concurrency": 16,
    "limiter_start_rpm": 0,
}
TAKEN_KEY = "promptq:worker:pipeline:taken"  # where the harness's takes land for a moment


@dataclass(frozen=True)
class Message:
    """A task message as the worker reads it (Celery protocol 2, JSON body in base64)."""

    task: str
    id: str
    retries: int
    args: list[Any]
    kwargs: dict[str, Any]

    @classmethod
    def decode(cls, raw: bytes | str) -> Message:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        headers = envelope["headers"]
        return cls(headers["task"], headers["id"], int(headers["retries"] or 0), args, kwargs)

    def deliveries(self, order: float | None = None) -> list[Delivery]:
        """The deliveries the Celery task would make of it (worker.app.tasks.deliveries_of),
        taken at ``order`` in its line."""
        return deliveries_of(self.task, self.id, self.retries, self.args, self.kwargs, order=order)


@dataclass(frozen=True)
class Parked:
    """A parked message: what it carries, and how long until it is due (Redis clock)."""

    message: Message
    due_in_s: float

    @property
    def state(self) -> DeliveryState:
        return DeliveryState.decode(self.message.kwargs)


class Pipeline:
    """Submit with the real client, then ``step()`` or ``drain()`` the queue through the same
    translation and core the Celery tasks use (deliveries_of, run_jobs), on one Runtime.

    Waits are parked in Redis as in production; ``advance()`` makes them due at once (or
    sooner by some seconds) by rescoring the parked set, then moves the due ones to the queue.
    """

    def __init__(
        self,
        redis_url: str,
        base_url: str,
        *,
        llm: Mapping[str, Any] | None = None,
        queue: Mapping[str, Any] | None = None,
    ) -> None:
        settings = load_settings(
            llm={**LLM_DEFAULTS, "base_url": base_url, **(llm or {})},
            queue={**QUEUE_DEFAULTS, "redis_url": redis_url, **(queue or {})},
        )
        self.rt = Runtime(settings)
        self.client = Client(redis_url)
        self.taken: list[bytes] = []  # every message taken from the queue, in order
        self._closed = False

    def take(self) -> list[Delivery] | None:
        """Take the next message as a worker would (the scheduler's claim) and return its
        deliveries; None when nothing can be taken now."""
        claimed = self.rt.scheduler.claim(TAKEN_KEY)
        if claimed is None:
            return None
        self.rt.redis.delete(TAKEN_KEY)  # delivered and acknowledged at once
        self.taken.append(claimed.message)
        return Message.decode(claimed.message).deliveries(claimed.order)

    def step(self) -> bool:
        """Run the next message's jobs (REDIS_UNAVAILABLE propagates, as to the Celery shell);
        False when the queue is empty."""
        deliveries = self.take()
        if deliveries is None:
            return False
        run_jobs(self.rt, deliveries)
        return True

    def advance(self, seconds: float | None = None) -> Moved:
        """Bring every parked message ``seconds`` closer to due (None: due now), then move the
        due ones to the queue, as a worker's ParkingMover would. A reserved rate-limit slot
        stays where it is in real time: a job back early sleeps for it, up to
        PROMPTQ_LIMITER_MAX_SLEEP_S (0 for none)."""
        redis = self.rt.redis
        now_ms = redis_now_ms(redis)
        for key in (PARKED_KEY, LANES_KEY):  # closed lanes open sooner too
            waiting: list[tuple[bytes, float]] = redis.zrange(  # type: ignore[assignment]
                key, 0, -1, withscores=True
            )
            scores = {
                member: min(score, now_ms) if seconds is None else score - seconds * 1000
                for member, score in waiting
            }
            if scores:
                redis.zadd(key, scores)
        return self.rt.parking.move_due()

    def drain(self, timeout_s: float = 10.0, *, skip_waits: bool = True) -> int:
        """Run messages until nothing is queued or parked; how many messages ran. Parked jobs
        are made due at once (``skip_waits``) or waited for in real time. TimeoutError when
        jobs are still queued or parked after ``timeout_s``."""
        deadline, ran = time.monotonic() + timeout_s, 0
        while True:
            if self.step():
                ran += 1
            else:
                moved = self.advance() if skip_waits else self.rt.parking.move_due()
                if moved.moved == 0 and moved.next_due_s is None:
                    return ran
                if moved.moved == 0 and moved.next_due_s is not None:  # wait for the next one
                    time.sleep(min(moved.next_due_s, max(0.0, deadline - time.monotonic())))
            if time.monotonic() > deadline:
                raise TimeoutError(f"still busy after {timeout_s:g} s ({ran} messages ran)")

    def parked(self) -> list[Parked]:
        """The parked messages, soonest due first."""
        parked: list[tuple[bytes, float]] = self.rt.redis.zrange(  # type: ignore[assignment]
            PARKED_KEY, 0, -1, withscores=True
        )
        now_ms = redis_now_ms(self.rt.redis)
        return [
            Parked(Message.decode(message), (score - now_ms) / 1000)
            for member, score in parked
            if (message := message_of_member(member)) is not None
        ]

    def limiter_state(self) -> dict[bytes, bytes]:
        """The one deployment's rate-limiter hash (times in microseconds)."""
        [key] = self.rt.redis.keys(f"{LIMITER_PREFIX}*")
        state: dict[bytes, bytes] = self.rt.redis.hgetall(key)  # type: ignore[assignment]
        return state

    def queued(self) -> list[Message]:
        """The messages waiting to be taken: pushed on the queue list (next first), then those
        in the scheduler's structure."""
        pushed = [raw for raw in reversed(self.rt.redis.lrange(QUEUE, 0, -1)) if raw != WAKE]
        waiting = [*pushed, *ready_messages(self.rt.redis)]
        return [Message.decode(raw) for raw in waiting]

    def close(self) -> None:
        """Close the clients and stop the call loop, cancelling what LiteLLM left on it (its
        logging worker) first, as asyncio.run would."""
        if self._closed:
            return
        self._closed, rt = True, self.rt
        if "call_loop" in rt.__dict__:
            [loop] = rt.call_loop.run([_running_loop()])
            assert isinstance(loop, asyncio.AbstractEventLoop)
            asyncio.run_coroutine_threadsafe(_cancel_leftovers(), loop).result(timeout=10)
        rt.close()
        self.client.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def _cancel_leftovers() -> None:
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


MakePipeline = Callable[..., Pipeline]  # the make_pipeline fixture (tests/unit/conftest.py)
