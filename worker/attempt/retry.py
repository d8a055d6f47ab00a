"""How long to wait before retry n: the one place the backoff schedule is decided."""

from __future__ import annotations

import random
from dataclasses import dataclass

from worker.settings import Settings

# Each wait is spread +-10 % (then clamped into [min_wait, max_wait]) so that workers that
# failed together do not retry together.
JITTER = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    """OpenHands' wait_exponential: clamp(multiplier * 2**n, min_wait, max_wait), jittered.

    With the defaults (2, 15 s, 120 s) the base waits for retries 0..7 are
    15, 15, 15, 16, 32, 64, 120, 120 s.
    """

    num_retries: int
    min_wait_s: float
    max_wait_s: float
    multiplier: float
    # The cap on a provider's Retry-After: beyond it a held retry could be redelivered.
    longest_wait_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        llm = settings.llm
        return cls(
            num_retries=llm.num_retries,
            min_wait_s=llm.retry_min_wait,
            max_wait_s=llm.retry_max_wait,
            multiplier=llm.retry_multiplier,
            longest_wait_s=max(settings.longest_wait_s, llm.retry_max_wait),
        )

    def base_wait_s(self, retry: int) -> float:
        """The un-jittered wait before retry number ``retry`` (0 for the first retry)."""
        exponential = self.multiplier * 2.0 ** min(retry, 64)
        return min(max(exponential, self.min_wait_s), self.max_wait_s)

    def wait_s(
        self, retry: int, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        """The countdown before retry ``retry``: jittered backoff, or Retry-After when longer,
        spread up to JITTER beyond it (never before it) so that the jobs a provider refused
        together do not all come back at the moment it named."""
        draw = (rng or random).uniform
        base = self.base_wait_s(retry)
        low = max(self.min_wait_s, base * (1 - JITTER))
        high = min(self.max_wait_s, base * (1 + JITTER))
        wait = draw(low, high)
        if retry_after_s is not None and retry_after_s > wait:
            wait = min(draw(retry_after_s, retry_after_s * (1 + JITTER)), self.longest_wait_s)
        return wait
