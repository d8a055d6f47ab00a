"""The state a job carries from one message to the next, and its one encoding in the message."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("promptq.worker")


@dataclass(frozen=True)
class DeliveryState:
    """What a job carries to its next message: its retry budget spent, and the rate-limit slot
    it holds, if any. Encoded as the task's keyword arguments (``encode``/``decode``): the only
    place that spells them out.
    """

    failures: int = 0  # provider failures so far: the retry budget spent
    # Set when the job holds a rate-limit slot: the tokens charged, and its start (epoch s).
    reserved_tokens: int | None = None
    slot_at: float | None = None

    def encode(self) -> dict[str, Any]:
        """Returns the task keyword arguments that carry this state."""
        kwargs: dict[str, Any] = {"failures": self.failures}
        if self.reserved_tokens is not None:
            kwargs |= {"reserved_tokens": self.reserved_tokens, "slot_at": self.slot_at}
        return kwargs

    @classmethod
    def decode(cls, kwargs: Mapping[str, Any]) -> DeliveryState:
        """Returns the state a message's keyword arguments carry. A value of the wrong type
        counts as absent (logged): the job runs, its retry budget or slot forgotten."""
        try:
            failures = max(0, int(kwargs.get("failures") or 0))
            reserved = kwargs.get("reserved_tokens")
            slot_at = kwargs.get("slot_at")
            if reserved is None:
                return cls(failures)
            return cls(failures, int(reserved), None if slot_at is None else float(slot_at))
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
            logger.warning("ignored a message's delivery state of the wrong type")
            return cls()
