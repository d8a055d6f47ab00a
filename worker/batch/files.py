"""The file formats of ``promptq batch``: JSONL requests in, OpenAI Batch API results out."""

from __future__ import annotations

import json
import math
import os
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from api_client import EmbeddingResult, InvalidRequest, JobError, PromptRequest, PromptResult
from api_client._requests import build_embedding_request, build_request
from api_client._schemas import JobRequest, JobResult
from worker.errors import OutputFormatError

# --- input ------------------------------------------------------------------------------------
#
# Each non-blank line of the input is one request, in one of two forms:
#
# * an OpenAI Batch API line, so files written for OpenAI's batch endpoint work unchanged:
#   {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
#    "body": {"model": "gpt-4o-mini", "messages": [...], "temperature": 0}}
#   custom_id is required; body.model and body.messages become the request's model and
#   messages, every other body key a parameter (the worker-owned ones are refused).
#   With "url": "/v1/embeddings" the body is an embeddings request instead:
#   {"model": "text-embedding-3-small", "input": "a text" or ["texts", ...], "dimensions": 256}
#   (the run's --model, a chat model, does not apply to it; without body.model the workers'
#   LLM_EMBEDDING_MODEL does).
# * a simple line: {"custom_id": "a", "prompt": "..."} or {"messages": [...]}, with an
#   optional "model" and any of KNOWN_PARAMS beside them. custom_id is optional: a line
#   without one is named "line-<n>" after its 1-based line number.
#
# A line with any of "method", "url" or "body" is read as an OpenAI line. Blank lines are
# skipped. Line numbers count every physical line, blank ones included, from 1.

CHAT_COMPLETIONS_URL = "/v1/chat/completions"
EMBEDDINGS_URL = "/v1/embeddings"
URLS = (CHAT_COMPLETIONS_URL, EMBEDDINGS_URL)

# The OpenAI chat-completion parameters a simple line may set at its top level. Anything else
# there is an "unknown field" (a typo would otherwise be sent to the provider or, worse,
# silently ignored by it). "metadata" is absent on purpose: the worker owns it.
KNOWN_PARAMS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "seed",
        "user",
        "reasoning_effort",
        "modalities",
        "audio",
        "prediction",
        "service_tier",
        "store",
        "web_search_options",
        "verbosity",
        "prompt_cache_key",
        "safety_identifier",
    }
)
_SIMPLE_FIELDS = frozenset({"custom_id", "prompt", "messages", "model"})
_OPENAI_FIELDS = frozenset({"custom_id", "method", "url", "body"})
_OPENAI_MARKERS = frozenset({"method", "url", "body"})
MAX_CUSTOM_ID_CHARS = 512
_MISSING: Any = object()  # a field absent from the line (as opposed to null)


@dataclass(frozen=True)
class BatchItem:
    """One valid request of the input file."""

    line: int  # 1-based line number in the input
    custom_id: str
    request: JobRequest


@dataclass(frozen=True)
class LineProblem:
    """Why one line of the input cannot be run."""

    line: int  # 1-based line number in the input
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class _Problem(Exception):
    """Raised while reading one line; becomes a LineProblem."""


def read_items(path: Path, model: str | None = None) -> Iterator[BatchItem | LineProblem]:
    """Yield each request of a JSONL input, or the problem with its line, in file order.

    Streams: one line is read and parsed at a time; only the custom_ids seen so far (and
    the line of each) are kept, to report duplicates. A custom_id is taken as soon as its
    line names it, even when the rest of that line has a problem. ``model``, when given,
    replaces every request's model (the run's ``--model``).
    """
    first_line: dict[str, int] = {}
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            raw = line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line  # a UTF-8 BOM
            if not raw.strip():
                continue
            try:
                yield _read_line(number, raw, model, first_line)
            except _Problem as problem:
                yield LineProblem(number, str(problem))


def check_input(
    path: Path, limit: int = 50, *, model: str | None = None
) -> tuple[int, list[LineProblem]]:
    """One streaming pass over the input: the number of valid items, and the first problems.

    At most ``limit`` problems are kept; the pass still reads the whole file to count.
    """
    valid = 0
    problems: list[LineProblem] = []
    for entry in read_items(path, model):
        if isinstance(entry, BatchItem):
            valid += 1
        elif len(problems) < limit:
            problems.append(entry)
    return valid, problems


def _read_line(number: int, raw: bytes, model: str | None, first_line: dict[str, int]) -> BatchItem:
    fields = _parse_object(raw)
    if _OPENAI_MARKERS & fields.keys():
        custom_id = _claim_id(number, fields.get("custom_id", _MISSING), first_line, None)
        _refuse_unknown(fields, _OPENAI_FIELDS, "an OpenAI batch line has only")
        request = _openai_request(fields, model)
    else:
        generated = f"line-{number}"
        custom_id = _claim_id(number, fields.get("custom_id", _MISSING), first_line, generated)
        _refuse_unknown(fields, _SIMPLE_FIELDS | KNOWN_PARAMS, None)
        request = _simple_request(fields, model)
    return BatchItem(number, custom_id, request)


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Problem(f"not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise _Problem(f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise _Problem("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        raise _Problem(f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _Problem(f"not a JSON object (got {_json_type(value)})")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _claim_id(number: int, value: Any, first_line: dict[str, int], generated: str | None) -> str:
    """Check a line's custom_id (generating it when allowed) and record it against duplicates."""
    if value is _MISSING:
        if generated is None:
            raise _Problem("missing custom_id (an OpenAI batch line needs one)")
        value = generated
    if not isinstance(value, str) or not value:
        raise _Problem(f"bad custom_id: must be a non-empty string, got {value!r}")
    if len(value) > MAX_CUSTOM_ID_CHARS:
        raise _Problem(
            f"bad custom_id: {len(value)} characters, at most {MAX_CUSTOM_ID_CHARS} allowed"
        )
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise _Problem(f"bad custom_id: {value!r} contains control characters")
    first = first_line.setdefault(value, number)
    if first != number:
        hint = " (lines without a custom_id are named line-<n>)" if value == generated else ""
        raise _Problem(f"duplicate custom_id {value!r} (first on line {first}){hint}")
    return value


def _refuse_unknown(fields: dict[str, Any], allowed: frozenset[str], hint: str | None) -> None:
    unknown = [name for name in fields if name not in allowed]
    if not unknown:
        return
    names = ", ".join(repr(name) for name in unknown)
    message = f"unknown field{'s' if len(unknown) > 1 else ''} {names}"
    if hint is not None:
        message += f" ({hint} {', '.join(sorted(allowed))})"
    raise _Problem(message)


def _openai_request(fields: dict[str, Any], model: str | None) -> JobRequest:
    for name in ("method", "url", "body"):
        if name not in fields:
            raise _Problem(
                f"missing {name!r} (an OpenAI batch line has custom_id, method, url and body)"
            )
    if fields["method"] != "POST":
        raise _Problem(f"method must be 'POST', got {fields['method']!r}")
    url = fields["url"]
    if url not in URLS:
        raise _Problem(f"unsupported url {url!r}: promptq runs {' and '.join(map(repr, URLS))}")
    body = fields["body"]
    if not isinstance(body, dict):
        raise _Problem(f"body must be a JSON object, got {_json_type(body)}")
    params = dict(body)
    if url == EMBEDDINGS_URL:
        return _embedding_request(params)
    if "messages" not in params:
        raise _Problem("body has no 'messages'")
    messages = params.pop("messages")
    line_model = params.pop("model", None)
    return _build(None, messages, line_model if model is None else model, params)


def _embedding_request(params: dict[str, Any]) -> JobRequest:
    if "input" not in params:
        raise _Problem("body has no 'input'")
    texts = params.pop("input")
    try:
        return build_embedding_request(texts, params.pop("model", None), params)
    except InvalidRequest as exc:
        raise _Problem(exc.message) from None


def _simple_request(fields: dict[str, Any], model: str | None) -> PromptRequest:
    params = {name: value for name, value in fields.items() if name in KNOWN_PARAMS}
    line_model = fields.get("model")
    return _build(
        fields.get("prompt"), fields.get("messages"), line_model if model is None else model, params
    )


def _build(prompt: Any, messages: Any, model: Any, params: dict[str, Any]) -> PromptRequest:
    try:
        return build_request(prompt, messages, model, params)
    except InvalidRequest as exc:
        raise _Problem(exc.message) from None


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
