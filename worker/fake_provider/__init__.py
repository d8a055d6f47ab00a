"""`promptq fake-provider`: a local OpenAI-compatible server with provider-like limits and faults.

Replies are deterministic: a chat completion echoes the last user message (``echo: ...``), an
embedding is a unit vector derived from a hash of the text. Limits behave like a provider's:

- ``rpm`` and ``tpm`` are token buckets *per model*: each holds ``burst_s`` seconds of budget
  (a whole minute by default), refills continuously (``rpm=600`` admits a burst of 600, then one
  request every 100 ms; with ``burst_s=2`` a burst of 20) and is charged only when a request is
  admitted, so a 429 costs nothing; a request costing more than the bucket holds is admitted
  when it is full and leaves a debt. A chat request is charged its
  estimated prompt tokens (``ceil(characters / 4)`` over all message text) plus ``max_tokens``
  when given (what a provider reserves), else plus the reply's tokens (known in advance, the
  reply being deterministic); an embeddings request its input's estimated tokens. A request
  larger than ``tpm`` gets a 429 without ``Retry-After`` ("Request too large"), as from OpenAI.
- ``shape`` enforces the limits the other ways providers do (``limits.Shape``): a bucket N
  requests deep (``bucket:N``, down to 1), fixed windows of S seconds (``window:S``), any S
  seconds (``sliding:S``); ``ramp`` caps how fast the admitted rate may rise (``limits.Ramp``:
  from a fraction of the limit, by at most X % a minute). The headers state the limits alone.
- Completion tokens are words: ``max_tokens`` truncates the reply to that many words
  (``finish_reason`` "length" when it cut something).
- Admitted requests wait ``latency`` ± ``jitter`` seconds, then answer 200 or, for an
  ``error_rate`` fraction drawn from a generator seeded with ``seed``, 500/502/503 (an admitted
  request that fails has still spent its capacity). 400s and 429s answer at once.
"""

from typing import TYPE_CHECKING, Any

from .command import add_arguments, main, run
from .config import FakeProviderConfig
from .replies import embedding_of

if TYPE_CHECKING:
    from .server import FakeProvider

__all__ = ["FakeProvider", "FakeProviderConfig", "add_arguments", "embedding_of", "main", "run"]


def __getattr__(name: str) -> Any:
    """FakeProvider loads aiohttp: only on first use, so building the CLI's parser stays light."""
    if name == "FakeProvider":
        from .server import FakeProvider  # noqa: PLC0415

        return FakeProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
