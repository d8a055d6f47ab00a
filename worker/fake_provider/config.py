"""The fake provider's settings, importable without loading aiohttp."""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import Ramp, Shape


@dataclass(frozen=True)
class FakeProviderConfig:
    """How the fake provider behaves; 0 for ``rpm``/``tpm`` means unlimited, port 0 a free port."""

    rpm: int = 0
    tpm: int = 0
    # How many seconds of the rpm/tpm budget can be spent at once (60: the whole minute).
    burst_s: float = 60.0
    # How rpm/tpm are enforced (limits.Shape): a bucket of burst_s by default.
    shape: Shape = field(default_factory=Shape)
    # A cap on how fast the admitted rate may rise (limits.Ramp); None: none.
    ramp: Ramp | None = None
    latency_s: float = 0.0
    jitter_s: float = 0.0
    error_rate: float = 0.0
    seed: int = 0
    dimensions: int = 8
    # Batches (/v1/batches): seconds from creation to completion; the share of lines that
    # fail (a 500 in the error file); the share left undone (the batch ends "expired").
    batch_delay_s: float = 1.0
    batch_failure_rate: float = 0.0
    batch_expired_share: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "latency_s", "jitter_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0 < self.burst_s <= 60:
            raise ValueError("burst_s must be above 0 and at most 60")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if self.batch_delay_s < 0:
            raise ValueError("batch_delay_s must be >= 0")
        shares = (self.batch_failure_rate, self.batch_expired_share)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError("batch_failure_rate and batch_expired_share must be >= 0, sum <= 1")
        if self.dimensions < 1:
            raise ValueError("dimensions must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")


def url_host(host: str) -> str:
    return f"http://[{host}]" if ":" in host else f"http://{host}"
