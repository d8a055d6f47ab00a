"""When a provider that refused a call says to come back: Retry-After in every form it takes."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

# Headers that say how long to wait, most precise first: milliseconds (OpenAI's SDK reads
# retry-after-ms; Azure sends x-ms-retry-after-ms), then Retry-After (seconds, or an HTTP date).
_MS_HEADERS = ("retry-after-ms", "x-ms-retry-after-ms")
# When each limit's budget refills: a duration (OpenAI: "1s", "6m0s", "20ms") or a time
# (Anthropic: RFC 3339), with the budget left beside it. Read only when nothing above was sent.
_RESETS = (
    ("x-ratelimit-reset-requests", "x-ratelimit-remaining-requests"),
    ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
    ("anthropic-ratelimit-requests-reset", "anthropic-ratelimit-requests-remaining"),
    ("anthropic-ratelimit-tokens-reset", "anthropic-ratelimit-tokens-remaining"),
    ("anthropic-ratelimit-input-tokens-reset", "anthropic-ratelimit-input-tokens-remaining"),
    ("anthropic-ratelimit-output-tokens-reset", "anthropic-ratelimit-output-tokens-remaining"),
)
# A wait stated in the error's body: {"retry_after": 30} (several OpenAI-compatible servers),
# {"retryDelay": "30s"} (Google's RetryInfo), or "Please retry after 20 seconds" / "try again in
# 1.5s" (Azure's and OpenAI's messages).
_BODY_PATTERNS = (
    re.compile(r'"retry_after(?:_seconds)?"\s*:\s*"?(\d+(?:\.\d+)?)', re.IGNORECASE),
    re.compile(r'"retryDelay"\s*:\s*"(\d+(?:\.\d+)?)s"'),
    re.compile(
        r"(?:retry after|try again in)\s+(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s\b|secs?\b|seconds?)",
        re.IGNORECASE,
    ),
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def retry_after_s(
    headers: Iterable[Mapping[str, Any]], body: str = "", now: float | None = None
) -> float | None:
    """How long the provider asked callers to wait, in seconds (None: it did not say).

    ``headers`` are the failed response's headers (several mappings: where LiteLLM keeps
    them), ``body`` the error's text. ``now`` is the epoch time that dates compare with.
    """
    found = [_normalized(mapping) for mapping in headers]
    now = time.time() if now is None else now
    for mapping in found:
        for name in _MS_HEADERS:
            ms = _number(mapping.get(name))
            if ms is not None:
                return ms / 1000
    for mapping in found:
        seconds = _seconds_or_date(mapping.get("retry-after"), now)
        if seconds is not None:
            return seconds
    stated = _from_body(body)
    if stated is not None:
        return stated
    return _until_reset(found, now)


def _normalized(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers by lower-case name, those LiteLLM passes on as "llm_provider-NAME" under
    NAME (where the response did not carry NAME itself)."""
    found: dict[str, Any] = {}
    for key, value in headers.items():
        name = str(key).lower()
        if name.startswith("llm_provider-"):
            found.setdefault(name.removeprefix("llm_provider-"), value)
        else:
            found[name] = value
    return found


def _seconds_or_date(value: Any, now: float) -> float | None:
    seconds = _number(value)
    if seconds is not None or not isinstance(value, str):
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _from_body(body: str) -> float | None:
    for pattern in _BODY_PATTERNS:
        match = pattern.search(body)
        if match:
            value = float(match.group(1))
            unit = match.group(2).lower() if pattern.groups > 1 else "s"
            return value / 1000 if unit.startswith("m") else value
    return None


def _until_reset(headers: list[dict[str, Any]], now: float) -> float | None:
    """The longest wait until an exhausted budget refills (or, when none says it is
    exhausted, the shortest of those stated)."""
    exhausted: list[float] = []
    others: list[float] = []
    for mapping in headers:
        for reset_name, remaining_name in _RESETS:
            wait = _duration_or_time(mapping.get(reset_name), now)
            if wait is None:
                continue
            remaining = _number(mapping.get(remaining_name))
            (exhausted if remaining is not None and remaining < 1 else others).append(wait)
    if exhausted:
        return max(exhausted)
    return min(others) if others else None


def _duration_or_time(value: Any, now: float) -> float | None:
    """A reset header's wait: seconds, a Go-style duration ("1m30.5s", "20ms"), or an
    RFC 3339 time."""
    seconds = _number(value)
    if seconds is not None or not isinstance(value, str):
        return seconds
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if parts and "".join(number + unit for number, unit in parts) == text:
        return sum(float(number) * _UNIT_S[unit] for number, unit in parts)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None
