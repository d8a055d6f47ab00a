"""The guard on the queue: what is not a promptq job is dropped and logged without its body.

Celery's own handlers log a refused message's whole body (where the prompt is), and kombu's
Redis transport lets a queue entry that is not JSON, or not a message envelope, escape from
the worker's event loop and stop the worker. Here each such entry is dropped (acknowledged or
rejected, so it is never delivered again) with one log line that says why, and no body.

The same transport also keeps a lost Redis connection from stopping the worker (see
GuardedChannel._connparams).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import signals
from celery.worker.consumer import Consumer
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import Base64

logger = logging.getLogger("promptq.worker")

_BASE64 = Base64()

# The name Celery shows the broker by ("Connected to promptq-redis://..."), and how kombu
# finds the transport from that name.
TRANSPORT = "promptq-redis"
TRANSPORT_ALIASES.setdefault(TRANSPORT, f"{__name__}:GuardedTransport")


def transport_for(broker_url: str) -> str | None:
    """The guarded transport for a redis:// URL; None (kombu's choice) for any other broker.

    Not for rediss://: kombu sets up TLS for a rediss URL only when the transport is named
    ``rediss``, so such a broker keeps kombu's own transport, unguarded.
    """
    if urlsplit(broker_url).scheme == "redis":
        return TRANSPORT
    return None


def refuse(why: str, message: Any = None) -> None:
    """Log one refused message: why, and its id when it has one; never its body."""
    headers = getattr(message, "headers", None)
    job_id = headers.get("id") if isinstance(headers, dict) else None
    about = f" (id {_short(job_id)})" if job_id is not None else ""
    logger.error("refused a message from the queue%s: %s; dropped, body not logged", about, why)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def envelope_problem(raw: Any) -> str | None:
    """Why a queue entry that parsed as JSON is not a message envelope kombu can read; or None."""
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not a message envelope"
    properties = raw.get("properties")
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        return "an envelope without properties.delivery_tag"
    if not isinstance(properties.get("delivery_info"), dict):
        return "an envelope without properties.delivery_info"
    headers = raw.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return "an envelope whose headers are not an object"
    return _body_problem(raw.get("body"), properties.get("body_encoding"))


def _body_problem(body: Any, encoding: Any) -> str | None:
    if not body or not encoding or str(encoding).lower() == "utf-8":
        return None  # kombu hands such a body over as it is
    if encoding != "base64":
        return f"an envelope with an unknown body encoding {_short(encoding)}"
    try:
        _BASE64.decode(body)  # type: ignore[no-untyped-call]  # kombu's own codec, untyped
    except (TypeError, ValueError):
        return "an envelope whose body is not base64"
    return None


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel, dropping a queue entry that is not JSON instead of raising, and
    sharing one Redis client between its commands."""

    _shared_client: Any = None  # (the pool it was made for, the client)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new redis.Redis for every delivery (to record it as unacknowledged)
        # and every acknowledgement: about 60 us of CPU each (it copies the client's response
        # callbacks), a measurable share of a job's cost. A redis.Redis is safe to share
        # between threads (each command takes a connection from the pool), so one client
        # serves them all, made again when kombu replaces its pool after a lost connection.
        if client:
            yield client
            return
        pool = self.pool
        shared = self._shared_client
        if shared is None or shared[0] is not pool:
            shared = self._shared_client = (pool, self._create_client())  # type: ignore[no-untyped-call]  # kombu, untyped
        yield shared[1]

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[no-untyped-call]  # untyped
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # BRPOP has already taken the entry off the queue: nothing to acknowledge.
            refuse(f"not JSON ({type(exc).__name__})")
            raise Empty from None  # what kombu raises when nothing was delivered

    def _connparams(self, asynchronous: bool = False) -> Any:
        # After Redis goes away with a job in flight, Celery collects the broken connection
        # (which detaches it from this channel) and then closes the channel, whose requeue of
        # the unacknowledged job then found no connection and raised AttributeError, which
        # stopped the worker (kombu 5.7). A connection error is what kombu and Celery expect
        # there: the worker reconnects, and the job, still in Redis' unacked set, comes back
        # after the visibility timeout.
        if self.connection.client is None:
            raise redis.ConnectionError("the connection to Redis was lost")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class GuardedTransport(kombu_redis.Transport):
    """kombu's Redis transport with GuardedChannel, and envelopes checked before delivery."""

    Channel = GuardedChannel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            refuse(problem)
            return
        super()._deliver(message, queue)  # type: ignore[no-untyped-call]  # kombu, untyped


class GuardedConsumer(Consumer):  # type: ignore[misc]  # Celery is untyped
    """Celery's consumer, refusing messages it cannot run with a log line that has no body.

    Each handler drops the message as Celery's does (ack or reject without requeue), so it is
    not delivered again, and sends the same signal.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        refuse(f"cannot decode its body ({type(exc).__name__}, {message.content_type!r})", message)
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        refuse("not a task message (no task name)", message)
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = headers.get("task")
        refuse(f"unknown task {_short(name)}", message)
        message.reject_log_error(logger, self.connection_errors)
        signals.task_unknown.send(
            sender=self, message=message, exc=exc, name=name, id=headers.get("id")
        )

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        refuse(f"an invalid task message ({type(exc).__name__})", message)
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)
