"""The client's settings: where Redis is, how long to wait for it, how big a prompt may be."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._constants import DEFAULT_REDIS_URL, DEFAULT_RESULT_TTL_S


class ClientSettings(BaseSettings):
    """Read from PROMPTQ_* environment variables; explicit arguments win."""

    model_config = SettingsConfigDict(env_prefix="PROMPTQ_", extra="ignore", allow_inf_nan=False)

    redis_url: str = DEFAULT_REDIS_URL
    # Bounds how long submit() can take when Redis is down or unreachable.
    connect_timeout_s: float = Field(default=2.0, gt=0)
    socket_timeout_s: float = Field(default=10.0, gt=0)
    # How long a queued job's state is kept; match the workers' PROMPTQ_RESULT_TTL_S.
    result_ttl_s: float = Field(default=DEFAULT_RESULT_TTL_S, gt=0)
    # submit() refuses a request whose messages hold more characters of text than this.
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    # wait()/as_completed() with no timeout ride out a Redis outage this long, then raise
    # BrokerUnavailable; with a timeout they keep retrying until it expires.
    max_outage_s: float = Field(default=300.0, gt=0)
    # submit_many() carries up to this many jobs in one message (1: one message per job): a
    # worker runs a pack's jobs concurrently and pays the queue's cost once.
    pack_size: int = Field(default=16, ge=1, le=256)
