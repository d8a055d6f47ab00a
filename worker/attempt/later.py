"""The one way a job comes back later: a message of its own, parked in Redis until it is due.

A wait for a time goes through ``come_back_later``, into the fleet's parked set
(worker.fleet.parking), which any worker moves back into the scheduler as jobs come due, each
at its place in its line:

- a retry after a transient failure, after the retry policy's backoff (worker.attempt.retry);
- a hand-back, when the process has had no free permit for too long (back at once).

A wait for the rate limit (no slot within PROMPTQ_LIMITER_MAX_SLEEP_S, or the deployment
paused by a long Retry-After) is not parked: the job goes back into its line in the scheduler,
whose lane stays closed until a slot is near (worker.attempt.throttle).

No worker holds a waiting job in its memory, so a fleet can hold any number of them, a worker
that stops loses none, and the scheduler has one structure to order. The parked message
carries the job's DeliveryState, and counts its deliveries so far.

Two returns to the queue are not waits, and stay outside this path:

- Redis cannot be reached during an attempt: the Celery shell rejects the message back to the
  queue (worker.app.tasks), to run again at once; nothing of the attempt was recorded.
- A worker process dies holding messages: they go back to the queue once it stops beating
  (worker.fleet.custody), or after kombu's visibility timeout as the last resort.
"""

from __future__ import annotations

from api_client._schedule import route_of
from api_client._schemas import JobRequest
from api_client._task_messages import task_message
from worker.fleet.delivery_state import DeliveryState
from worker.fleet.parking import Parking


def come_back_later(
    parking: Parking,
    job_id: str,
    request: JobRequest,
    *,
    state: DeliveryState,
    deliveries: int,
    delay_s: float,
    order: float | None,
) -> None:
    """Park the job as a message of its own, due in ``delay_s``, carrying ``state``, after
    ``deliveries`` deliveries of the job; it comes back at ``order`` in its line (None: ahead
    of it) (blocking Redis call)."""
    message = task_message(job_id, request, kwargs=state.encode(), retries=deliveries)
    parking.park(route_of(request), message, delay_s, order=order)
