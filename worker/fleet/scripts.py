"""Calls of promptq's Lua scripts as values: built once by the store, the limiter and the spend
ledger, then run blocking (any thread) or on the event loop, several in one round trip."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from worker.errors import REDIS_DOWN

T = TypeVar("T")

# Redis cannot be reached right now (either client).

# A Lua prelude that sets ``now_ms``: Redis's own clock in milliseconds, one clock for every
# worker whatever their machines' clocks say.
LUA_NOW_MS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


def redis_now_ms(client: redis.Redis) -> int:
    """Redis's own clock in milliseconds (as LUA_NOW_MS reads it in a script)."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@dataclass(frozen=True)
class ScriptCall(Generic[T]):
    """One call of a registered script, and how its reply reads."""

    script: Script  # registered on the worker's blocking client
    keys: Sequence[Any]
    args: Sequence[Any]
    parse: Callable[[Any], T]

    def run(self) -> T:
        """Run it now on the script's blocking client."""
        return self.parse(self.script(keys=self.keys, args=self.args))


class LoopRedis:
    """The event loop's own connection pool to Redis: it runs script calls without a thread
    and without blocking the loop. The calls asked for in one turn of the loop (a pack's jobs
    starting together, answers arriving together) go in one pipelined round trip."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._waiting: list[_Asked] = []
        self._sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def run(self, *calls: ScriptCall[Any]) -> list[Any]:
        """Each call's parsed reply, in order; else the first error (Redis unreachable:
        redis.ConnectionError or TimeoutError, as the blocking client raises them)."""
        asked = _Asked(calls, asyncio.get_running_loop().create_future())
        if not self._waiting:  # the first this turn: send them all once the turn is over
            sending = asyncio.get_running_loop().create_task(self._send_waiting())
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)
        self._waiting.append(asked)
        return await asked.answer

    async def run_one(self, call: ScriptCall[T]) -> T:
        [reply] = await self.run(call)
        return reply  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self._client.aclose()

    async def _send_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        calls = [call for asked in batch for call in asked.calls]
        try:
            replies = await self._replies(calls)
        except asyncio.CancelledError:  # the loop is going away: so are its callers
            for asked in batch:
                asked.answer.cancel()
            raise
        except Exception as exc:  # every caller gets it
            for asked in batch:
                asked.fail(exc)
            return
        at = 0
        for asked in batch:
            asked.answer_with(replies[at : at + len(asked.calls)])
            at += len(asked.calls)

    async def _replies(self, calls: Sequence[ScriptCall[Any]]) -> list[Any]:
        """Every call's raw reply (or its error), running a script Redis has forgotten again
        once it is loaded."""
        replies = await self._send(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # Redis restarted (or flushed its scripts): load them, run those again
            for script in {calls[i].script.sha: calls[i].script for i in missing}.values():
                await self._client.script_load(script.script)
            again = await self._send([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _send(self, calls: Sequence[ScriptCall[Any]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))


@dataclass
class _Asked:
    """Calls one caller asked for together, and the future it awaits."""

    calls: Sequence[ScriptCall[Any]]
    answer: asyncio.Future[list[Any]]

    def fail(self, exc: BaseException) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)

    def answer_with(self, replies: list[Any]) -> None:
        error = next((reply for reply in replies if isinstance(reply, Exception)), None)
        if error is not None:
            self.fail(error)
            return
        try:
            parsed = [call.parse(reply) for call, reply in zip(self.calls, replies, strict=True)]
        except Exception as exc:
            self.fail(exc)
            return
        if not self.answer.done():
            self.answer.set_result(parsed)


def patiently(run: Callable[[], T], patience_s: float) -> T:
    """``run()``, tried again while Redis is unreachable, for up to ``patience_s``."""
    deadline = time.monotonic() + patience_s
    pause_s = 0.1
    while True:
        try:
            return run()
        except REDIS_DOWN:
            if time.monotonic() + pause_s > deadline:
                raise
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 2.0)


async def patiently_on_loop(run: Callable[[], Awaitable[T]], patience_s: float) -> T:
    """``await run()``, tried again while Redis is unreachable, for up to ``patience_s``."""
    deadline = time.monotonic() + patience_s
    pause_s = 0.1
    while True:
        try:
            return await run()
        except REDIS_DOWN:
            if time.monotonic() + pause_s > deadline:
                raise
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, 2.0)
