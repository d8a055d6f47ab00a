"""Script calls (worker.fleet.scripts) run blocking and on the event loop, against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio

from tests.support.redis_server import RedisServer
from tests.support.threads import off_main_thread
from worker.fleet.scripts import LoopRedis, ScriptCall, patiently, patiently_on_loop

T = TypeVar("T")

_INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
_ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
def blocking(real_redis: RedisServer) -> Iterator[redis.Redis]:
    client = real_redis.client()
    client.flushall()
    client.script_flush()
    yield client
    client.close()


def on_loop(url: str, use: Callable[[LoopRedis], Awaitable[T]]) -> T:
    """``use`` a fresh LoopRedis on ``url`` in an event loop of its own."""

    async def main() -> T:
        loop_redis = LoopRedis(redis.asyncio.Redis.from_url(url, socket_timeout=5))
        try:
            return await use(loop_redis)
        finally:
            await loop_redis.close()

    return off_main_thread(lambda: asyncio.run(main()))


def incr_by(client: redis.Redis, key: str, amount: int) -> ScriptCall[int]:
    return ScriptCall(client.register_script(_INCR_BY), keys=[key], args=[amount], parse=int)


def test_a_call_runs_blocking_and_on_the_loop_alike(
    blocking: redis.Redis, real_redis: RedisServer
) -> None:
    assert incr_by(blocking, "n", 2).run() == 2
    assert on_loop(real_redis.url, lambda r: r.run_one(incr_by(blocking, "n", 3))) == 5
    assert blocking.get("n") == b"5"


def test_several_calls_run_together_and_answer_in_order(
    blocking: redis.Redis, real_redis: RedisServer
) -> None:
    echo = ScriptCall(
        blocking.register_script(_ECHO),
        keys=["k"],
        args=["v"],
        parse=lambda r: [p.decode() for p in r],
    )
    calls: list[ScriptCall[Any]] = [incr_by(blocking, "a", 1), echo, incr_by(blocking, "a", 10)]
    assert on_loop(real_redis.url, lambda r: r.run(*calls)) == [1, ["k", "v"], 11]


def test_scripts_redis_forgot_are_loaded_again(
    blocking: redis.Redis, real_redis: RedisServer
) -> None:
    """A restarted Redis has no scripts: the loop loads the ones it needs and runs the calls
    that met NOSCRIPT once, so none of them runs twice."""
    known = incr_by(blocking, "known", 1)
    known.run()  # its script is loaded now; the other script is not
    unknown = ScriptCall(
        blocking.register_script("return redis.call('INCR', KEYS[1]) + 100"),
        keys=["unknown"],
        args=[],
        parse=int,
    )

    async def use(loop_redis: LoopRedis) -> list[Any]:
        first = await loop_redis.run(known, unknown)
        blocking.script_flush()
        return [first, await loop_redis.run_one(unknown), await loop_redis.run_one(known)]

    assert on_loop(real_redis.url, use) == [[2, 101], 102, 3]


def test_a_script_error_is_raised(blocking: redis.Redis, real_redis: RedisServer) -> None:
    blocking.set("text", "not a number")
    calls = [incr_by(blocking, "fine", 1), incr_by(blocking, "text", 1)]
    with pytest.raises(redis.ResponseError, match="not an integer"):
        on_loop(real_redis.url, lambda r: r.run(*calls))
    assert blocking.get("fine") == b"1"


def test_a_parse_error_reaches_the_caller(blocking: redis.Redis, real_redis: RedisServer) -> None:
    def refuse(_reply: Any) -> None:
        raise LookupError("refused")

    call = ScriptCall(blocking.register_script(_INCR_BY), keys=["n"], args=[1], parse=refuse)
    with pytest.raises(LookupError, match="refused"):
        on_loop(real_redis.url, lambda r: r.run_one(call))


def test_unreachable_redis_raises_the_blocking_clients_errors(
    blocking: redis.Redis, closed_port: int
) -> None:
    url = f"redis://127.0.0.1:{closed_port}/0"
    with pytest.raises(redis.ConnectionError):
        on_loop(url, lambda r: r.run_one(incr_by(blocking, "n", 1)))


class Flaky:
    """Fails with a Redis connection error ``failures`` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise redis.ConnectionError("down")
        return "stored"

    async def on_loop(self) -> str:
        return self()


def test_patiently_tries_again_while_redis_is_down() -> None:
    flaky = Flaky(failures=2)
    assert patiently(flaky, patience_s=10) == "stored"
    assert flaky.calls == 3
    flaky = Flaky(failures=2)
    assert off_main_thread(lambda: asyncio.run(patiently_on_loop(flaky.on_loop, 10))) == "stored"
    assert flaky.calls == 3


def test_patience_runs_out() -> None:
    flaky = Flaky(failures=1000)
    with pytest.raises(redis.ConnectionError):
        patiently(flaky, patience_s=0.25)
    assert 2 <= flaky.calls < 10
    flaky = Flaky(failures=1000)
    with pytest.raises(redis.ConnectionError):
        off_main_thread(lambda: asyncio.run(patiently_on_loop(flaky.on_loop, 0.25)))
    assert 2 <= flaky.calls < 10


def test_no_patience_means_one_try() -> None:
    flaky = Flaky(failures=1)
    with pytest.raises(redis.ConnectionError):
        patiently(flaky, patience_s=0.0)
    assert flaky.calls == 1


class CountingRedis(redis.asyncio.Redis):
    """A redis.asyncio client that counts the pipelines it sends."""

    pipelines = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        type(self).pipelines += 1
        return super().pipeline(*args, **kwargs)


def test_calls_asked_for_in_one_turn_share_a_round_trip(
    blocking: redis.Redis, real_redis: RedisServer
) -> None:
    """Twenty callers at once (a pack's jobs): one pipeline; each gets its own replies, and a
    caller whose call fails gets the error alone."""
    blocking.set("text", "not a number")

    async def caller(loop_redis: LoopRedis, n: int) -> Any:
        if n == 7:
            return await loop_redis.run(incr_by(blocking, "text", 1))
        return await loop_redis.run(incr_by(blocking, f"own{n}", n), incr_by(blocking, "all", 1))

    async def main() -> list[Any]:
        CountingRedis.pipelines = 0
        loop_redis = LoopRedis(CountingRedis.from_url(real_redis.url, socket_timeout=5))
        try:
            incr_by(blocking, "all", 0).run()  # the script is loaded: no NOSCRIPT round
            return await asyncio.gather(
                *(caller(loop_redis, n) for n in range(20)), return_exceptions=True
            )
        finally:
            await loop_redis.close()

    answers = off_main_thread(lambda: asyncio.run(main()))
    assert CountingRedis.pipelines == 1
    assert isinstance(answers[7], redis.ResponseError)
    fine = [answer for n, answer in enumerate(answers) if n != 7]
    assert [own for own, _ in fine] == [n for n in range(20) if n != 7]
    assert sorted(total for _, total in fine) == list(range(1, 20))
