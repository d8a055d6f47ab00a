"""A job as a message delivered it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api_client._schemas import JobRequest
from worker.fleet.delivery_state import DeliveryState


@dataclass(frozen=True)
class CeleryOrigin:
    """What a job that another Celery app sent keeps of its first message (its Celery request
    context): what its Celery records end with ('' when its sender wants no result), and the
    message that runs its canvas once it has ended (None when it has none)."""

    records_tail: str
    followup: bytes | None


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
    # Set for a message another Celery app sent (without promptq's header): the job is taken
    # in on its first delivery (worker.attempt.adopt).
    origin: CeleryOrigin | None = None
    # Why the message's arguments are not one request (the job fails bad_request), or None.
    problem: str | None = None
