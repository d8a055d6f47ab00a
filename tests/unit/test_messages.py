"""worker.llm.content: images stripped (LLM_DISABLE_VISION), cache marks (LLM_CACHING_PROMPT)."""

from __future__ import annotations

import copy
from typing import Any

from worker.llm.content import IMAGE_PLACEHOLDER, with_cache_marks, without_images

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
MARK = {"type": "ephemeral"}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


# --- without_images -------------------------------------------------------------------------


def test_text_and_images_become_the_text_alone() -> None:
    messages = [{"role": "user", "content": [_text("What is this?"), IMAGE, _text("Be brief.")]}]

    assert without_images(messages) == [{"role": "user", "content": "What is this?\nBe brief."}]


def test_a_message_of_images_only_gets_the_placeholder() -> None:
    messages = [{"role": "user", "content": [IMAGE, IMAGE]}]

    assert without_images(messages) == [{"role": "user", "content": IMAGE_PLACEHOLDER}]


def test_anthropic_image_parts_are_images_too() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    messages = [{"role": "user", "content": [image, _text("Describe it.")]}]

    assert without_images(messages) == [{"role": "user", "content": "Describe it."}]


def test_other_parts_keep_the_list_form() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    marked = {**_text("Long context"), "cache_control": MARK}
    messages = [{"role": "user", "content": [marked, IMAGE, audio]}]

    assert without_images(messages) == [{"role": "user", "content": [marked, audio]}]


def test_messages_without_images_are_left_as_they_are() -> None:
    text_parts = [_text("a"), _text("b")]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": text_parts},  # a list of text parts is not collapsed
        {"role": "assistant", "content": None, "tool_calls": []},
    ]

    result = without_images(messages)

    assert result == messages
    assert result[1]["content"] is text_parts


def test_other_fields_of_a_message_are_kept() -> None:
    messages = [{"role": "user", "name": "alice", "content": [IMAGE, _text("hi")]}]

    assert without_images(messages) == [{"role": "user", "name": "alice", "content": "hi"}]


def test_without_images_does_not_change_its_input() -> None:
    messages = [{"role": "user", "content": [_text("x"), IMAGE]}]
    before = copy.deepcopy(messages)

    without_images(messages)

    assert messages == before


# --- with_cache_marks -----------------------------------------------------------------------


def test_system_and_last_user_message_are_marked() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second question"},
    ]

    assert with_cache_marks(messages) == [
        {"role": "system", "content": [{**_text("You are terse."), "cache_control": MARK}]},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": [{**_text("Second question"), "cache_control": MARK}]},
    ]


def test_the_mark_goes_on_the_last_part_of_a_content_list() -> None:
    messages = [{"role": "user", "content": [_text("Look:"), IMAGE]}]

    assert with_cache_marks(messages) == [
        {"role": "user", "content": [_text("Look:"), {**IMAGE, "cache_control": MARK}]}
    ]


def test_without_a_system_message_only_the_last_user_message_is_marked() -> None:
    messages = [
        {"role": "user", "content": "Question"},
        {"role": "assistant", "content": "Answer"},
    ]

    marked = with_cache_marks(messages)

    assert marked[0] == {"role": "user", "content": [{**_text("Question"), "cache_control": MARK}]}
    assert marked[1] == messages[1]


def test_a_later_system_message_is_not_marked() -> None:
    messages = [
        {"role": "user", "content": "Question"},
        {"role": "system", "content": "Mid-conversation instruction"},
    ]

    marked = with_cache_marks(messages)

    assert marked[1] == messages[1]


def test_a_lone_system_message_is_marked_once() -> None:
    messages = [{"role": "system", "content": "Only instructions"}]

    assert with_cache_marks(messages) == [
        {"role": "system", "content": [{**_text("Only instructions"), "cache_control": MARK}]}
    ]


def test_messages_with_the_callers_own_marks_are_left_alone() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [{**_text("Big document"), "cache_control": MARK}]},
        {"role": "user", "content": "Question"},
    ]

    assert with_cache_marks(messages) == messages


def test_with_cache_marks_does_not_change_its_input() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [_text("s")]},
        {"role": "user", "content": "u"},
    ]
    before = copy.deepcopy(messages)

    with_cache_marks(messages)

    assert messages == before
