"""Counting the messages that enter the queue and are taken from it, as Redis reports each
change to the queue's list (keyspace notifications)."""

from __future__ import annotations

import uuid
from collections import Counter
from types import TracebackType

import redis

from api_client._constants import QUEUE

PUSHES = ("lpush", "rpush")  # a publish, a retry, a message given back
TAKES = ("lpop", "rpop")  # a worker's take (BLMOVE) or anything else popping it


class QueueEvents:
    """Within a ``with`` block, every push onto the queue and every take from it.

    Turns on Redis' keyspace notifications for lists (restored at the end) and listens to the
    queue's key; counts are read after a marker published last, so every change made before
    the read is counted.
    """

    def __init__(self, client: redis.Redis, queue: str = QUEUE) -> None:
        self._client = client
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self._channel = f"__keyspace@{db}__:{queue}"
        self._marker = f"promptq-test:queue-events:{uuid.uuid4().hex}"
        self._saved = ""
        self._events: Counter[str] = Counter()
        self._pubsub = client.pubsub()  # type: ignore[no-untyped-call]  # redis-py, untyped

    def __enter__(self) -> QueueEvents:
        saved = self._client.config_get("notify-keyspace-events")["notify-keyspace-events"]
        self._saved = str(saved)
        self._client.config_set("notify-keyspace-events", f"{self._saved}Kl")
        self._pubsub.subscribe(self._channel, self._marker)
        confirmed = 0
        while confirmed < 2:  # only then is a change to the queue sure to be reported
            message = self._pubsub.get_message(timeout=5)
            assert message is not None, "no subscription confirmed"
            confirmed += message["type"] == "subscribe"
        return self

    def counts(self) -> Counter[str]:
        """How many times each command changed the queue since the block began."""
        self._client.publish(self._marker, "read")
        while True:
            message = self._pubsub.get_message(timeout=5)
            assert message is not None, "the marker did not come back"
            if message["type"] != "message":
                continue
            if message["channel"].decode() == self._marker:
                return Counter(self._events)
            self._events[message["data"].decode()] += 1

    def pushes(self) -> int:
        counts = self.counts()
        return sum(counts[name] for name in PUSHES)

    def takes(self) -> int:
        counts = self.counts()
        return sum(counts[name] for name in TAKES)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pubsub.close()
        self._client.config_set("notify-keyspace-events", self._saved)
