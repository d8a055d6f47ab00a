"""The input of ``promptq batch``: JSONL request lines, in OpenAI Batch API or simple form."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api_client import InvalidRequest, PromptRequest
from api_client._requests import build_embedding_request, build_request
from api_client._schemas import JobRequest

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
