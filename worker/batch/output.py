"""The output of ``promptq batch``: result lines in the OpenAI Batch API format, resumable."""

from __future__ import annotations

import json
import math
import os
import uuid
from datetime import UTC
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from api_client import EmbeddingResult, JobError, PromptResult
from api_client._schemas import JobResult
from worker.errors import OutputFormatError

# --- output -----------------------------------------------------------------------------------
#
# One line per finished request, in the OpenAI Batch API output format, so code that reads
# OpenAI batch results reads these:
#
#   {"id": "batch_req_<job id, no dashes>", "custom_id": "a",
#    "response": {"status_code": 200, "request_id": "<job id>", "body": <ChatCompletion>},
#    (for an embeddings line, "body" is a CreateEmbeddingResponse: {"object": "list", ...})
#    "error": null,
#    "promptq": {"cost_usd": 0.0001, "attempts": 1, "latency_s": 0.8}}
#
# A failure has "error": {"code": <ErrorKind>, "message": ...}, and "response" null, or, when
# the provider answered with an HTTP status, {"status_code": <it>, "request_id": <job id>,
# "body": {"error": {"message", "type": <kind>, "param": null, "code": <kind>}}}. The
# "promptq" key (ignored by OpenAI clients) holds what the ChatCompletion has no place for;
# cost_usd and latency_s are null on failures. A line is a success exactly when its "error"
# is null and its response has status 200 (OpenAI itself writes HTTP failures with a null
# "error"; read_done reads those as failures too).

_ALLOWED_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


class OutputWriter:
    """Appends result lines to a JSONL output, so an interrupted run can resume.

    On open, a partial last line (a crash mid-write) is cut off first; ``trimmed_bytes``
    says how many bytes went. Each line is written with one ``write`` call and flushed at
    once, so a killed process loses at most the line it was writing. The file is fsynced
    every ``fsync_every`` lines and on close, which bounds what an operating-system crash
    or power loss can take. Not thread-safe.
    """

    def __init__(self, path: Path, *, fsync_every: int = 100) -> None:
        self.path = path
        self.trimmed_bytes = _trim_partial_line(path)
        self._fsync_every = max(1, fsync_every)
        self._unsynced = 0
        self._file: BinaryIO | None = open(path, "ab")  # noqa: SIM115 (closed by close())

    def write_success(self, custom_id: str, result: JobResult) -> None:
        """Record a request that succeeded."""
        self._write(
            {
                "id": _line_id(result.id),
                "custom_id": custom_id,
                "response": {
                    "status_code": 200,
                    "request_id": result.id,
                    "body": response_body(result),
                },
                "error": None,
                "promptq": {
                    "cost_usd": _finite(result.cost_usd),
                    "attempts": result.attempts,
                    "latency_s": _finite(result.latency_s),
                },
            }
        )

    def write_failure(self, custom_id: str, job_id: str | None, error: JobError) -> None:
        """Record a request that failed; ``job_id`` is None when it never became a job."""
        kind = error.kind.value
        response = None
        if error.status_code is not None:
            response = {
                "status_code": error.status_code,
                "request_id": job_id,
                "body": {
                    "error": {"message": error.message, "type": kind, "param": None, "code": kind}
                },
            }
        self._write(
            {
                "id": _line_id(job_id),
                "custom_id": custom_id,
                "response": response,
                "error": {"code": kind, "message": error.message},
                "promptq": {"cost_usd": None, "attempts": error.attempts, "latency_s": None},
            }
        )

    def close(self) -> None:
        """Flush and fsync the file, then close it. Idempotent."""
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"output {self.path} is closed")
        # ASCII JSON: non-ASCII text is escaped, so even a lone surrogate cannot fail to encode.
        data = json.dumps(record, separators=(",", ":")) + "\n"
        self._file.write(data.encode("ascii"))
        self._file.flush()
        self._unsynced += 1
        if self._unsynced >= self._fsync_every:
            os.fsync(self._file.fileno())
            self._unsynced = 0


def response_body(result: JobResult) -> dict[str, Any]:
    """The body OpenAI's endpoint would have answered: a ChatCompletion or an embedding list."""
    if isinstance(result, EmbeddingResult):
        return embedding_list(result)
    return chat_completion(result)


def embedding_list(result: EmbeddingResult) -> dict[str, Any]:
    """A complete OpenAI CreateEmbeddingResponse (as JSON-ready dict) for one result."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(result.vectors)
        ],
        "model": result.model,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "total_tokens": result.usage.total_tokens or result.usage.prompt_tokens,
        },
    }


def chat_completion(result: PromptResult) -> dict[str, Any]:
    """A complete OpenAI ChatCompletion (as JSON-ready dict) for one result.

    A finish_reason outside OpenAI's set (or missing) becomes "tool_calls" when the message
    calls tools, else "stop", so the body validates as openai's ChatCompletion.
    """
    message = dict(result.message)
    if message.get("role") is None:
        message["role"] = "assistant"
    message.setdefault("content", None)
    finish = result.finish_reason
    if finish not in _ALLOWED_FINISH:
        finish = "tool_calls" if message.get("tool_calls") else "stop"
    created = result.created
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    usage: dict[str, Any] = {
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.total_tokens,
    }
    if result.usage.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": result.usage.cached_tokens}
    return {
        "id": f"chatcmpl-{result.id}",
        "object": "chat.completion",
        "created": int(created.timestamp()),
        "model": result.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
    }


def _line_id(job_id: str | None) -> str:
    # A request that never became a job still needs a line id: a fresh one.
    return "batch_req_" + (job_id.replace("-", "") if job_id else uuid.uuid4().hex)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _trim_partial_line(path: Path, chunk: int = 1 << 16) -> int:
    """Cut the file back to its last newline; return the bytes removed (0 if none or no file)."""
    try:
        file = open(path, "r+b")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return 0
    with file:
        size = file.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - chunk)
            file.seek(start)
            block = file.read(end - start)
            newline = block.rfind(b"\n")
            if newline != -1:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return 0
        file.truncate(end)
        file.flush()
        os.fsync(file.fileno())
        return size - end


def read_done(path: Path) -> tuple[set[str], set[str]]:
    """The custom_ids that already succeeded, and those that failed, in an existing output.

    A missing file gives two empty sets; a partial last line (a crash mid-write) is
    ignored. An id that failed and later succeeded counts as succeeded only. Raises
    OutputFormatError on any other line that is not an output line (a wrong -o file).
    """
    succeeded: set[str] = set()
    failed: set[str] = set()
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return succeeded, failed
    with file:
        for number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                break  # a partial last line: the writer trims it on reopen
            if not raw.strip():
                continue
            custom_id, ok = _read_output_line(path, number, raw)
            (succeeded if ok else failed).add(custom_id)
    return succeeded, failed - succeeded


def _read_output_line(path: Path, number: int, raw: bytes) -> tuple[str, bool]:
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise OutputFormatError(f"{path}, line {number}: not a JSON line ({exc})") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("custom_id"), str)
        or "error" not in record
        or "response" not in record
    ):
        raise OutputFormatError(
            f"{path}, line {number}: not a batch output line "
            "(expected custom_id, response and error)"
        )
    response = record["response"]
    ok = (
        record["error"] is None
        and isinstance(response, dict)
        and response.get("status_code") == 200
    )
    return record["custom_id"], ok
