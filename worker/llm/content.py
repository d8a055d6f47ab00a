"""Transforms of a request's messages before the call: images removed, prompt-cache marks."""

from __future__ import annotations

from typing import Any

# Content-part types that carry an image: OpenAI's image_url, Anthropic's native image.
IMAGE_PART_TYPES = frozenset({"image_url", "image"})
# What a message that held nothing but images says instead, so that no message goes empty
# (providers refuse empty content) and the conversation keeps its turns.
IMAGE_PLACEHOLDER = "[image omitted: this model is used without vision]"
CACHE_MARK: dict[str, str] = {"type": "ephemeral"}


def without_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every image part removed (LLM_DISABLE_VISION); the input is unchanged.

    A message whose content list keeps only plain text parts gets them as one string (joined
    by newlines, as OpenHands sends text-only messages), since text-only servers may refuse
    content lists; one that keeps other parts (cache marks, audio, files) keeps its list. A
    message that held only images gets IMAGE_PLACEHOLDER as its text. Messages without
    images are returned as they were.

    >>> without_images([{"role": "user", "content": [
    ...     {"type": "text", "text": "What is this?"},
    ...     {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])
    [{'role': 'user', 'content': 'What is this?'}]
    """
    return [_message_without_images(message) for message in messages]


def _message_without_images(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list) or not any(_is_image(part) for part in content):
        return message
    kept = [part for part in content if not _is_image(part)]
    if not kept:
        return {**message, "content": IMAGE_PLACEHOLDER}
    if all(_is_plain_text(part) for part in kept):
        return {**message, "content": "\n".join(part["text"] for part in kept)}
    return {**message, "content": kept}


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def _is_plain_text(part: Any) -> bool:
    return (
        isinstance(part, dict)
        and part.keys() == {"type", "text"}
        and part["type"] == "text"
        and isinstance(part["text"], str)
    )


def with_cache_marks(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with prompt-cache breakpoints (LLM_CACHING_PROMPT), as OpenHands sets them:
    ``cache_control: {"type": "ephemeral"}`` on the last content part of the first message
    when it is the system prompt, and of the last user message. String content becomes a
    one-part text list to carry the mark. The input is unchanged.

    Messages that already carry a ``cache_control`` anywhere are returned as they are: the
    caller placed its own breakpoints (providers allow only a few).

    >>> with_cache_marks([{"role": "user", "content": "Hi"}])[0]["content"]
    [{'type': 'text', 'text': 'Hi', 'cache_control': {'type': 'ephemeral'}}]
    """
    if any(_has_cache_mark(message) for message in messages):
        return messages
    marked = list(messages)
    targets: list[int] = []
    if marked and marked[0].get("role") == "system":
        targets.append(0)
    last_user = next(
        (i for i in range(len(marked) - 1, -1, -1) if marked[i].get("role") == "user"), None
    )
    if last_user is not None and last_user not in targets:
        targets.append(last_user)
    for index in targets:
        marked[index] = _marked(marked[index])
    return marked


def _marked(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content and isinstance(content[-1], dict):
        parts = list(content)
    else:  # no content, or a shape we do not know: leave it alone
        return message
    parts[-1] = {**parts[-1], "cache_control": dict(CACHE_MARK)}
    return {**message, "content": parts}


def _has_cache_mark(message: dict[str, Any]) -> bool:
    if "cache_control" in message:
        return True
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(part, dict) and "cache_control" in part for part in content
    )
