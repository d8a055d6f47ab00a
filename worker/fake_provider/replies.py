"""What fake-provider answers: request validation, echo completions, hash embeddings, errors."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from collections.abc import Sequence
from typing import Any

Payload = dict[str, Any]
_MAX_TOKENS = 2**31


class BadRequest(Exception):
    """The request cannot be answered: a 400 naming the offending parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> Payload:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def text_of(content: object) -> str:
    """Text of a message ``content``: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def estimate_tokens(texts: Sequence[str]) -> int:
    """Prompt tokens, estimated as a quarter of the characters (at least 1)."""
    return max(1, math.ceil(sum(len(text) for text in texts) / 4))


def _model_of(body: Payload) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    return model


def _optional_int(body: Payload, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer between {low} and {high}", name)
    return value


def plan_chat(body: Payload) -> tuple[str, int, Payload]:
    """(model, tokens to charge, the ChatCompletion without its id) for a chat request."""
    model = _model_of(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    if not all(isinstance(message, dict) for message in messages):
        raise BadRequest("each message must be an object", "messages")
    if body.get("stream"):
        raise BadRequest("fake-provider does not stream; send stream=false", "stream")
    max_tokens = _optional_int(body, "max_completion_tokens", 1, _MAX_TOKENS)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1, _MAX_TOKENS)
    texts = [text_of(message.get("content")) for message in messages]
    users = [
        text for message, text in zip(messages, texts, strict=True) if message.get("role") == "user"
    ]
    content, finish_reason = f"echo: {users[-1] if users else ''}", "stop"
    words = content.split()
    if max_tokens is not None and len(words) > max_tokens:
        words = words[:max_tokens]
        content, finish_reason = " ".join(words), "length"
    prompt_tokens, completion_tokens = estimate_tokens(texts), len(words)
    reply = {
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    charge = prompt_tokens + (completion_tokens if max_tokens is None else max_tokens)
    return model, charge, reply


def embedding_of(text: str, dimensions: int) -> list[float]:
    """The deterministic unit vector fake-provider answers for ``text``."""
    digest = hashlib.shake_256(text.encode("utf-8")).digest(4 * dimensions)
    raw = [value / 2**31 - 1.0 for value in struct.unpack(f"<{dimensions}I", digest)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def plan_embeddings(body: Payload, default_dimensions: int) -> tuple[str, int, Payload]:
    """(model, tokens to charge, the CreateEmbeddingResponse) for an embeddings request."""
    model = _model_of(body)
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise BadRequest("'input' must be a string or a non-empty array of strings", "input")
    dimensions = _optional_int(body, "dimensions", 1, 65536) or default_dimensions
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    data = []
    for index, text in enumerate(inputs):
        vector: list[float] | str = embedding_of(text, dimensions)
        if encoding == "base64":  # what the openai SDK asks for unless told otherwise
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = estimate_tokens(inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return model, tokens, {"object": "list", "data": data, "model": model, "usage": usage}
