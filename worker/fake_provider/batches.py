"""The fake provider's OpenAI-compatible Files and Batches: uploads, batch jobs that finish
after a set delay (lines failing or expiring as configured), their output and error files."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .replies import BadRequest, Payload, error_body, plan_chat, plan_embeddings

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
COMPLETION_WINDOWS = {"24h": 86_400.0}
EXPIRED = "This request could not be executed before the completion window expired."


class NotFound(Exception):
    """No file or batch by that id."""


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def payload(self) -> Payload:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Payload | None
    lines: list[Payload]
    created_at: float
    done_at: float  # when it completes (or expires)
    expires_at: float
    status: str = "in_progress"
    finished_at: float | None = None
    cancelled_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def payload(self) -> Payload:
        stamp = {
            "completed": "completed_at",
            "expired": "expired_at",
            "cancelled": "cancelled_at",
        }.get(self.status)
        body: Payload = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": int(self.created_at),
            "expires_at": int(self.expires_at),
            "request_counts": {
                "total": len(self.lines),
                "completed": self.counts.get("completed", 0),
                "failed": self.counts.get("failed", 0),
            },
            "metadata": self.metadata,
        }
        for name in ("completed_at", "expired_at", "cancelled_at", "failed_at", "finalizing_at"):
            body[name] = None
        if stamp is not None and self.finished_at is not None:
            body[stamp] = int(self.finished_at)
        return body


class BatchStore:
    """Files and batches, on the server's event loop. A batch is in progress for
    ``delay_s`` after its creation, then completes: each line answered as the sync endpoint
    would (no rate limit), or failed (``failure_rate``, a 500 in the error file), or left
    undone (``expired_share``: the batch ends "expired", those lines in the error file with
    code "batch_expired")."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        delay_s: float,
        failure_rate: float,
        expired_share: float,
        dimensions: int,
        seed: int,
    ) -> None:
        self._clock = clock
        self._delay_s = delay_s
        self._failure_rate = failure_rate
        self._expired_share = expired_share
        self._dimensions = dimensions
        self._random = random.Random(f"batches:{seed}")  # noqa: S311  (reproducible on purpose)
        self._ids = itertools.count(1)
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}

    def add_file(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        stored = StoredFile(
            f"file-{next(self._ids)}", filename, purpose, content, int(self._clock())
        )
        self.files[stored.id] = stored
        return stored

    def file(self, file_id: str) -> StoredFile:
        if file_id not in self.files:
            raise NotFound(f"No such File object: {file_id}")
        return self.files[file_id]

    def create_batch(self, body: Payload) -> Batch:
        """A batch of the input file's lines (BadRequest: a body or file it cannot run)."""
        endpoint, window = body.get("endpoint"), body.get("completion_window", "24h")
        if endpoint not in BATCH_ENDPOINTS:
            raise BadRequest(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}", "endpoint")
        if window not in COMPLETION_WINDOWS:
            raise BadRequest("completion_window must be '24h'", "completion_window")
        try:
            source = self.file(str(body.get("input_file_id")))
        except NotFound as exc:
            raise BadRequest(str(exc), "input_file_id") from None
        lines = _parse_lines(source.content, str(endpoint))
        now = self._clock()
        batch = Batch(
            f"batch_{next(self._ids)}",
            source.id,
            str(endpoint),
            str(window),
            body.get("metadata"),
            lines,
            created_at=now,
            done_at=now + self._delay_s,
            expires_at=now + COMPLETION_WINDOWS[str(window)],
        )
        self.batches[batch.id] = batch
        return batch

    def batch(self, batch_id: str) -> Batch:
        """The batch as it stands now (finished once its delay has passed)."""
        if batch_id not in self.batches:
            raise NotFound(f"No batch found with id '{batch_id}'")
        batch = self.batches[batch_id]
        if batch.status == "in_progress" and self._clock() >= batch.done_at:
            self._finish(batch, "completed")
        elif batch.status == "cancelling":
            batch.status, batch.finished_at = "cancelled", batch.cancelled_at
        return batch

    def cancel(self, batch_id: str) -> Batch:
        batch = self.batch(batch_id)
        if batch.status == "in_progress":
            batch.status, batch.cancelled_at = "cancelling", self._clock()
            batch.counts = {"completed": 0, "failed": 0}
        return batch

    def _finish(self, batch: Batch, status: str) -> None:
        output: list[Payload] = []
        errors: list[Payload] = []
        expired = 0
        for n, line in enumerate(batch.lines):
            custom_id = line.get("custom_id")
            line_id = f"{batch.id}_req_{n}"
            draw = self._random.random()
            if draw < self._expired_share:
                expired += 1
                error = {"code": "batch_expired", "message": EXPIRED}
                errors.append(
                    {"id": line_id, "custom_id": custom_id, "response": None, "error": error}
                )
            elif draw < self._expired_share + self._failure_rate:
                body = error_body("fake-provider injected batch line failure", "server_error")
                response = {"status_code": 500, "request_id": line_id, "body": body}
                errors.append(
                    {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
                )
            else:
                response = {
                    "status_code": 200,
                    "request_id": line_id,
                    "body": self._answer(line, n),
                }
                output.append(
                    {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
                )
        batch.status = "expired" if expired else status
        batch.finished_at = batch.done_at
        batch.counts = {"completed": len(output), "failed": len(errors) - expired}
        if output:
            batch.output_file_id = self._jsonl(f"{batch.id}_output.jsonl", output).id
        if errors:
            batch.error_file_id = self._jsonl(f"{batch.id}_error.jsonl", errors).id

    def _answer(self, line: Payload, n: int) -> Payload:
        body = line["body"]
        if line["url"] == "/v1/chat/completions":
            _, _, reply = plan_chat(body)
            return {"id": f"chatcmpl-batch-{n}", **reply}
        _, _, reply = plan_embeddings(body, self._dimensions)
        return reply

    def _jsonl(self, filename: str, rows: list[Payload]) -> StoredFile:
        content = "".join(json.dumps(row) + "\n" for row in rows).encode()
        return self.add_file(filename, "batch_output", content)


def _parse_lines(content: bytes, endpoint: str) -> list[Payload]:
    """The input file's requests: each line {"custom_id", "method": "POST", "url", "body"},
    its url the batch's endpoint, its body one the sync endpoint accepts."""
    lines: list[Payload] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.decode("utf-8", "replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            raise BadRequest(
                f"line {number} of the input file is not JSON", "input_file_id"
            ) from None
        if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
            raise BadRequest(f"line {number} has no body object", "input_file_id")
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or custom_id in seen:
            raise BadRequest(f"line {number}: custom_id missing or repeated", "input_file_id")
        if line.get("url") != endpoint or line.get("method", "POST") != "POST":
            raise BadRequest(f"line {number}: url must be {endpoint} (POST)", "input_file_id")
        if endpoint == "/v1/chat/completions":
            plan_chat(line["body"])  # BadRequest for a body the endpoint refuses
        else:
            plan_embeddings(line["body"], 1)
        seen.add(custom_id)
        lines.append(line)
    if not lines:
        raise BadRequest("the input file holds no requests", "input_file_id")
    return lines
