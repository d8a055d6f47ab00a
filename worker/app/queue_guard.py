"""promptq's Redis transport: reliable takes from the queue, and a guard that drops what is
not a promptq job, logged without its body.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged only
after the worker has read the reply: a worker killed in between took the message with it.
Here one BLMOVE takes the message into the process's own ``taken`` list (worker.fleet.custody), and
the step that records it as unacknowledged also moves it from there to the process's ``held``
hash, in one MULTI: a message is never out of Redis' sight.

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
from time import monotonic, time
from typing import Any, NoReturn
from urllib.parse import urlsplit

import redis
from celery import signals
from celery.worker.consumer import Consumer
from celery.worker.state import active_requests, reserved_requests, scheduled_requests
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import Base64

from api_client._constants import QUEUE
from api_client._schedule import WAKE
from worker.fleet.custody import this_process
from worker.fleet.schedule import CLAIM_SCRIPT, CLAIM_SHA, ORDER_HEADER, claim_keys, claimed

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


class CustodyQoS(kombu_redis.QoS):
    """kombu's unacknowledged-message records, kept with this process's custody: recording a
    delivery also moves the message from the process's taken list to its held hash, and
    acknowledging (or returning) it removes it from there, each in one MULTI. A message whose
    acknowledgement or return could not reach Redis is settled once it can."""

    def append(self, message: Any, delivery_tag: str) -> None:
        custody = this_process()
        taken = self.channel.connection.pop_taken()
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
            record = json.dumps([message._raw, exchange, routing_key])
            pipe.hset(self.unacked_key, delivery_tag, record)
            pipe.hset(custody.held_key, delivery_tag, taken or json.dumps(message._raw))
            if taken is not None:
                pipe.lrem(custody.taken_key, 1, taken)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]  # kombu, untyped
        except BaseException:
            # Redis is out of reach: the message stayed held by this live process until the
            # visibility timeout, then ran again. It is acknowledged before the next take
            # instead (its job has its outcome, or a message of its own for its retry).
            this_process().settle_later([delivery_tag], give_back=False)
            raise

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]
        except BaseException:
            this_process().settle_later([delivery_tag], give_back=requeue)  # as for ack
            raise

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)  # type: ignore[no-untyped-call]
        return pipe.hdel(this_process().held_key, delivery_tag)


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel taking messages with BLMOVE into the process's custody, dropping
    a queue entry that is not a message envelope instead of raising, and sharing one Redis
    client between its commands."""

    QoS = CustodyQoS
    _shared_client: Any = None  # (the pool it was made for, the client)
    _taking_from: str | None = None  # the queue of the take in flight
    _take_command = "BLMOVE"  # the command of that take: BLMOVE, or EVALSHA for a claim
    _claim_next = True  # the next take from promptq's queue claims from the scheduler
    _drop_wake = False  # the last take moved a wake-up into the taken list: remove it

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

    def _brpop_start(self, timeout: float | None = None) -> None:
        # A take from promptq's queue claims the next job from the scheduler's structure
        # (worker.fleet.schedule) while there is one; when none can be taken, the next take
        # blocks on the queue list (a BLMOVE into the process's custody, as for any other
        # queue) until a wake-up, a message pushed there, or its timeout; then it claims again.
        # One queue per take (BLMOVE has one source): promptq workers consume one queue, and
        # messages queued with a Celery priority are folded into it (worker.fleet.custody).
        # With several queues, each gets the next take in turn.
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(1)
        if not queues:
            return
        custody = this_process()
        claim = queues[0] == QUEUE and self._claim_next
        with self.conn_or_acquire() as client:
            custody.before_take(client, 0 if claim else timeout or 0)
        self._taking_from = queues[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu's None default
        if claim:
            self._take_command = "EVALSHA"
            keys = claim_keys(custody.taken_key)
            drop = WAKE if self._drop_wake else b""
            self.client.connection.send_command("EVALSHA", CLAIM_SHA, len(keys), *keys, drop)
        else:
            self._take_command = "BLMOVE"
            self.client.connection.send_command(
                "BLMOVE", queues[0], custody.taken_key, "RIGHT", "LEFT", timeout or 0
            )

    def _brpop_read(self, **options: Any) -> Any:
        source, command = self._taking_from, self._take_command
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except redis.ResponseError as exc:  # the claim script failed
                self._claim_failed(exc)
            except self.connection_errors:
                # The next take returns to the queue whatever this one may have moved.
                self.client.connection.disconnect()
                raise
            order = None
            if command == "EVALSHA":
                claim = claimed(reply)
                taken, order = (None, None) if claim is None else claim
                self._drop_wake = False
                self._claim_next = taken is not None  # none now: block until woken
            else:
                taken = reply
                self._claim_next = True  # woken, timed out, or a message: claim next
                self._drop_wake = taken == WAKE
            if taken is None or source is None or taken == WAKE:
                this_process().answered()
                if source is not None:
                    self._queue_cycle.rotate(source)
                raise Empty()
            self._deliver_taken(source, taken, order)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's False default
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]  # kombu, untyped

    def _claim_failed(self, exc: redis.ResponseError) -> NoReturn:
        if isinstance(exc, redis.exceptions.NoScriptError):  # a new or restarted Redis
            with self.conn_or_acquire() as client:
                client.script_load(CLAIM_SCRIPT)
        else:  # a bug: take from the queue list meanwhile, and say so
            logger.error("cannot take from the scheduler: %s", exc)
            self._claim_next = False
        this_process().answered()
        raise Empty() from None

    def _deliver_taken(self, source: str, taken: bytes, order: float | None) -> None:
        """Deliver a message this process took from ``source`` (with its ``order`` in its
        line, when taken from the scheduler: the task reads it as ORDER_HEADER), or drop it
        from its custody when it is not a message envelope."""
        try:
            message = json.loads(taken)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._drop_taken(taken, f"not JSON ({type(exc).__name__})")
        problem = envelope_problem(message)
        if problem is not None:
            self._drop_taken(taken, problem)
        if order is not None:
            message["headers"] = {**(message.get("headers") or {}), ORDER_HEADER: order}
        self._queue_cycle.rotate(source)
        self.connection.taken = taken  # recorded as delivered with it (CustodyQoS.append)
        try:
            self.connection._deliver(message, source)
        finally:
            self.connection.taken = None
        this_process().answered()

    def _drop_taken(self, taken: bytes, why: str) -> NoReturn:
        custody = this_process()
        with self.conn_or_acquire() as client:
            client.lrem(custody.taken_key, 1, taken)
        custody.answered()
        refuse(why)
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
    # The exact bytes of the message being delivered from a take (GuardedChannel), already
    # checked: CustodyQoS.append moves them out of the taken list.
    taken: bytes | None = None

    def pop_taken(self) -> bytes | None:
        taken, self.taken = self.taken, None
        return taken

    def _deliver(self, message: Any, queue: str) -> None:
        if self.taken is None:  # not from a take: a fanout (control) message
            problem = envelope_problem(message)
            if problem is not None:
                refuse(problem)
                return
        super()._deliver(message, queue)  # type: ignore[no-untyped-call]  # kombu, untyped


def _delivery_tag(request: Any) -> str | None:
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    return tag if isinstance(tag, str) else None


class GuardedConsumer(Consumer):  # type: ignore[misc]  # Celery is untyped
    """Celery's consumer, refusing messages it cannot run with a log line that has no body,
    and giving back at once the messages it drops with a lost connection.

    Each handler drops the message as Celery's does (ack or reject without requeue), so it is
    not delivered again, and sends the same signal.
    """

    def on_close(self) -> None:
        # Celery forgets the messages it had reserved or held for their ETA when its
        # connection closes (a Redis restart, say); unacknowledged, they came back only after
        # the visibility timeout (an hour by default). They go back to the queue before this
        # process's next take instead. Calls in flight go on and are acknowledged as usual.
        dropped = {*reserved_requests, *scheduled_requests} - set(active_requests)
        tags = [tag for request in dropped if (tag := _delivery_tag(request)) is not None]
        this_process().settle_later(tags, give_back=True)
        super().on_close()

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
