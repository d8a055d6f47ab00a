"""worker.llm.retry_after: every way a provider says how long to wait."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from worker.llm.retry_after import retry_after_s

NOW = 1_800_000_000.0  # an epoch time the dates are compared with


def at(offset_s: float) -> datetime:
    return datetime.fromtimestamp(NOW + offset_s, tz=UTC)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "2.5"}, 2.5),  # any case
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),  # the precise one first
        ({"x-ms-retry-after-ms": "250"}, 0.25),  # Azure
        ({"llm_provider-retry-after": "4"}, 4.0),  # as LiteLLM passes it on
        ({"retry-after": format_datetime(at(90), usegmt=True)}, 90.0),  # an HTTP date
        ({"retry-after": format_datetime(at(-90), usegmt=True)}, 0.0),  # passed: at once
        # OpenAI's reset durations: the exhausted budget's, Go-style.
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1m30.5s",
                "x-ratelimit-remaining-tokens": "5000",
                "x-ratelimit-reset-tokens": "20ms",
            },
            90.5,
        ),
        ({"x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "20ms"}, 0.02),
        # Anthropic's: RFC 3339 times.
        (
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": at(12).isoformat().replace("+00:00", "Z"),
            },
            12.0,
        ),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "nan"}, None),
        ({"x-ratelimit-reset-requests": "later"}, None),
        ({}, None),
    ],
)
def test_headers(headers: dict[str, str], expected: float | None) -> None:
    found = retry_after_s([headers], now=NOW)
    assert found == (None if expected is None else pytest.approx(expected, abs=0.01))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"error": {"message": "slow down", "retry_after": 30}}', 30.0),
        ('{"error": {"retry_after": "7.5"}}', 7.5),
        ('{"error": {"details": [{"retryDelay": "42s"}]}}', 42.0),  # Google's RetryInfo
        ("Requests have exceeded the limit. Please retry after 20 seconds.", 20.0),  # Azure
        ("Rate limit reached. Please try again in 1.5s.", 1.5),  # OpenAI
        ("Rate limit reached. Please try again in 350ms.", 0.35),
        ("Rate limit reached for requests", None),
    ],
)
def test_bodies(body: str, expected: float | None) -> None:
    assert retry_after_s([], body=body, now=NOW) == expected


def test_a_header_goes_before_the_body() -> None:
    assert retry_after_s([{"retry-after": "3"}], body='{"retry_after": 30}', now=NOW) == 3.0
