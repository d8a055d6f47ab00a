"""A job as a message delivered it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api_client._schemas import JobRequest
from worker.fleet.delivery_state import DeliveryState


@dataclass(frozen=True)
class Delivery:
    """One job as a message delivered it."""

    job_id: str
    # What the message asks for; None when its task names nothing a worker runs.
    request_type: type[JobRequest] | None
    request: Any  # the message's request, not validated yet
    state: DeliveryState = field(default_factory=DeliveryState)
    deliveries: int = 1  # the job's deliveries, this one included
    task_name: str = ""  # the message's task, as it named it
    # Where the job stands in its line (api_client._schedule): it goes back there when it is
    # put back or parked. None when not known (a message pushed on the Celery queue list).
    order: float | None = None
