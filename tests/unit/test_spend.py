"""worker.fleet.spend's Lua scripts, on fakeredis (lupa) and on a real redis-server alike."""

from __future__ import annotations

import pytest
import redis

from api_client import Client, InvalidRequest
from api_client._constants import budget_key
from tests.support.redis_server import RedisServer
from worker.errors import BudgetExceeded
from worker.fleet.spend import SpendLedger, global_key


def spent(lua_redis: redis.Redis, key: str) -> tuple[float, float]:
    fields = lua_redis.hgetall(key)
    return float(fields.get(b"spent", 0)), float(fields.get(b"reserved", 0))


def test_without_a_cap_spend_is_only_recorded(lua_redis: redis.Redis) -> None:
    ledger = SpendLedger(lua_redis, max_usd=None, period="total")
    assert not ledger.applies(None)
    ledger.book(None, 0.25, None).run()
    ledger.book(None, 0.5, None).run()
    assert spent(lua_redis, global_key("total")) == (0.75, 0)


def test_the_global_cap_counts_spent_and_reserved(lua_redis: redis.Redis) -> None:
    ledger = SpendLedger(lua_redis, max_usd=1.0, period="total")
    assert ledger.applies(None)
    first = ledger.reserve(None, 0.4).run()
    second = ledger.reserve(None, 0.4).run()
    with pytest.raises(BudgetExceeded, match=r"PROMPTQ_MAX_SPEND_USD is \$1\.0000"):
        ledger.reserve(None, 0.4).run()  # 0.8 reserved + 0.4 > 1.0

    ledger.book(first, 0.1, None).run()  # it cost less than feared: room again
    assert spent(lua_redis, global_key("total")) == pytest.approx((0.1, 0.4))
    third = ledger.reserve(None, 0.4).run()
    ledger.book(second, 0.3, None).run()
    ledger.book(third, 0.3, None).run()
    assert spent(lua_redis, global_key("total")) == pytest.approx((0.7, 0.0))


def test_a_budget_caps_only_its_own_jobs(lua_redis: redis.Redis) -> None:
    lua_redis.hset(budget_key("b1"), "max", 0.5)
    ledger = SpendLedger(lua_redis, max_usd=None, period="total")
    assert ledger.applies("b1")
    reservation = ledger.reserve("b1", 0.3).run()
    with pytest.raises(BudgetExceeded, match=r"budget 'b1' is \$0\.5000"):
        ledger.reserve("b1", 0.3).run()
    ledger.reserve(None, 10.0).run()  # a job without the budget is not held back by it

    ledger.book(reservation, 0.2, "b1").run()
    assert spent(lua_redis, budget_key("b1")) == pytest.approx((0.2, 0.0))
    assert spent(lua_redis, global_key("total"))[0] == pytest.approx(0.2)


def test_an_unknown_budget_refuses(lua_redis: redis.Redis) -> None:
    ledger = SpendLedger(lua_redis, max_usd=None, period="total")
    with pytest.raises(BudgetExceeded, match="'nope' does not exist"):
        ledger.reserve("nope", 0.01).run()
    assert not lua_redis.exists(budget_key("nope"))


def test_daily_and_monthly_counters_are_separate_and_expire(lua_redis: redis.Redis) -> None:
    day = SpendLedger(lua_redis, max_usd=5.0, period="day")
    day.book(day.reserve(None, 1.0).run(), 1.0, None).run()
    key = global_key("day")
    assert key.startswith("promptq:spend:day:")
    assert spent(lua_redis, key)[0] == 1.0
    assert 0 < lua_redis.pttl(key) <= 3 * 86400 * 1000
    assert not lua_redis.exists(global_key("total"))
    assert global_key("day", now=0) == "promptq:spend:day:1970-01-01"
    assert global_key("month", now=0) == "promptq:spend:month:1970-01"


@pytest.mark.parametrize(
    ("max_usd", "budget_id", "problem"),
    [
        (-1, None, ">= 0"),
        (float("inf"), None, "finite"),
        ("10", None, "a number"),
        (True, None, "a number"),
        (1.0, "has space", "not a budget id"),
        (1.0, "x" * 129, "not a budget id"),
    ],
)
def test_create_budget_refuses_bad_input(
    closed_port: int, max_usd: object, budget_id: str | None, problem: str
) -> None:
    with (
        Client(f"redis://127.0.0.1:{closed_port}/0") as client,
        pytest.raises(InvalidRequest, match=problem),
    ):
        client.create_budget(max_usd, budget_id)  # type: ignore[arg-type]


def test_create_budget_sets_the_cap_with_the_result_ttl(real_redis: RedisServer) -> None:
    with Client(real_redis.url) as client:
        budget = client.create_budget(2.5)
        assert client.create_budget(3, budget_id="named") == "named"
    connection = real_redis.client()
    assert budget.startswith("budget-")
    assert float(connection.hget(budget_key(budget), "max") or 0) == 2.5
    assert connection.pttl(budget_key("named")) > 0
    connection.close()
