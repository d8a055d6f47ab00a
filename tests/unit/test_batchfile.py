"""worker.batch.input and .output: the JSONL input forms and problems, the OpenAI-format output."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from openai.types import CreateEmbeddingResponse, ErrorObject
from openai.types.chat import ChatCompletion

from api_client import (
    EmbeddingRequest,
    EmbeddingResult,
    ErrorKind,
    JobError,
    PromptRequest,
    PromptResult,
    Usage,
)
from worker.batch.input import KNOWN_PARAMS, BatchItem, LineProblem, check_input, read_items
from worker.batch.output import OutputWriter, read_done
from worker.errors import OutputFormatError

CHAT = "/v1/chat/completions"
JOB_ID = "0b6f3c3e-6d4e-4a51-9f5e-2f7a3a1c9d10"


def write_lines(path: Path, *lines: str | dict[str, Any]) -> Path:
    with path.open("w", encoding="utf-8") as file:
        for line in lines:
            file.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def entries(tmp_path: Path, *lines: str | dict[str, Any]) -> list[BatchItem | LineProblem]:
    return list(read_items(write_lines(tmp_path / "in.jsonl", *lines)))


def only_problem(tmp_path: Path, *lines: str | dict[str, Any]) -> LineProblem:
    problems = [e for e in entries(tmp_path, *lines) if isinstance(e, LineProblem)]
    assert len(problems) == 1, problems
    return problems[0]


def openai_line(custom_id: Any = "a", /, **body: Any) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


# --- accepted forms ---------------------------------------------------------------------------


def test_openai_line_maps_model_messages_and_params(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    line = openai_line("req-1", temperature=0, max_tokens=5, seed=7)
    line["body"]["messages"] = messages
    assert entries(tmp_path, line) == [
        BatchItem(
            1,
            "req-1",
            PromptRequest(
                messages=messages,
                model="gpt-4o-mini",
                params={"temperature": 0, "max_tokens": 5, "seed": 7},
            ),
        )
    ]


def test_openai_body_passes_any_non_reserved_key_as_a_param(tmp_path: Path) -> None:
    (item,) = entries(tmp_path, openai_line(some_provider_option={"x": 1}))
    assert isinstance(item, BatchItem)
    assert item.request.params == {"some_provider_option": {"x": 1}}


def test_openai_line_without_model_leaves_it_to_the_worker(tmp_path: Path) -> None:
    line = openai_line()
    del line["body"]["model"]
    (item,) = entries(tmp_path, line)
    assert isinstance(item, BatchItem)
    assert item.request.model is None


def test_simple_prompt_line(tmp_path: Path) -> None:
    (item,) = entries(tmp_path, {"custom_id": "q", "prompt": "Name a prime.", "temperature": 0})
    assert item == BatchItem(
        1,
        "q",
        PromptRequest(
            messages=[{"role": "user", "content": "Name a prime."}], params={"temperature": 0}
        ),
    )


def test_simple_messages_line_with_model(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    (item,) = entries(tmp_path, {"messages": messages, "model": "m1", "stop": ["\n"]})
    assert item == BatchItem(
        1, "line-1", PromptRequest(messages=messages, model="m1", params={"stop": ["\n"]})
    )


def test_simple_line_accepts_every_known_param(tmp_path: Path) -> None:
    line: dict[str, Any] = {"prompt": "hi"}
    line.update({name: 1 for name in KNOWN_PARAMS})
    (item,) = entries(tmp_path, line)
    assert isinstance(item, BatchItem)
    assert item.request.params.keys() == KNOWN_PARAMS
    assert "metadata" not in KNOWN_PARAMS  # the worker owns it


def test_missing_custom_ids_are_named_after_their_line(tmp_path: Path) -> None:
    found = entries(
        tmp_path, {"prompt": "a"}, "", {"custom_id": "x", "prompt": "b"}, {"prompt": "c"}
    )
    assert [(e.line, e.custom_id) for e in found if isinstance(e, BatchItem)] == [
        (1, "line-1"),
        (3, "x"),
        (4, "line-4"),
    ]
    # Stable: reading again gives the same ids.
    assert list(read_items(tmp_path / "in.jsonl")) == found


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path: Path) -> None:
    found = entries(tmp_path, "", "   ", {"prompt": "a"}, "\t", {"prompt": "b"}, "")
    assert [e.line for e in found] == [3, 5]
    assert all(isinstance(e, BatchItem) for e in found)


def test_crlf_line_endings_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [e.custom_id for e in read_items(path) if isinstance(e, BatchItem)] == [
        "line-1",
        "line-2",
    ]


def test_last_line_without_newline_is_read(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}', encoding="utf-8")
    assert len([e for e in read_items(path) if isinstance(e, BatchItem)]) == 2


def test_model_override_replaces_every_model(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "in.jsonl",
        openai_line("a"),
        {"prompt": "b", "model": "m-line"},
        {"prompt": "c"},
        {"prompt": "d", "model": ""},  # a bad model on the line is replaced, not checked
    )
    found = list(read_items(path, model="override"))
    assert [e.request.model for e in found if isinstance(e, BatchItem)] == ["override"] * 4
    assert [e.request.model for e in read_items(path) if isinstance(e, BatchItem)] == [
        "gpt-4o-mini",
        "m-line",
        None,
    ]


def test_check_input_counts_items_and_keeps_the_first_problems(tmp_path: Path) -> None:
    lines: list[str | dict[str, Any]] = [{"prompt": "ok"}] * 3 + ["[1]"] * 5
    path = write_lines(tmp_path / "in.jsonl", *lines)
    valid, problems = check_input(path, limit=2)
    assert valid == 3
    assert [p.line for p in problems] == [4, 5]
    assert check_input(path) == (
        3,
        [LineProblem(n, "not a JSON object (got an array)") for n in range(4, 9)],
    )
    assert check_input(path, model="m")[0] == 3


# --- problems ---------------------------------------------------------------------------------


def test_line_problem_str_names_the_line() -> None:
    assert str(LineProblem(7, "prompt is empty")) == "line 7: prompt is empty"


def test_malformed_json_names_the_error(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, {"prompt": "a"}, '{"prompt": "b",}')
    assert problem.line == 2
    assert problem.message.startswith("malformed JSON: ")
    assert "column" in problem.message


@pytest.mark.parametrize(
    "text", ['{"prompt": NaN}', "[" * 100_000, '{"prompt": "a"', '"just a string'], ids=str.__len__
)
def test_other_malformed_json(tmp_path: Path, text: str) -> None:
    problem = only_problem(tmp_path, text)
    assert problem.line == 1
    assert problem.message.startswith("malformed JSON: ")


def test_invalid_utf8_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    assert list(read_items(path))[1] == LineProblem(2, "not valid UTF-8 (byte 13)")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[1, 2]", "an array"),
        ('"hi"', "a string"),
        ("3", "a number"),
        ("null", "null"),
        ("true", "a boolean"),
    ],
)
def test_non_object_line(tmp_path: Path, text: str, kind: str) -> None:
    assert only_problem(tmp_path, text) == LineProblem(1, f"not a JSON object (got {kind})")


def test_duplicate_custom_id_names_the_first_line(tmp_path: Path) -> None:
    problem = only_problem(
        tmp_path,
        {"custom_id": "a", "prompt": "1"},
        {"custom_id": "b", "prompt": "2"},
        openai_line("a"),
    )
    assert problem == LineProblem(3, "duplicate custom_id 'a' (first on line 1)")


def test_duplicate_of_a_generated_id_explains_the_naming(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, {"custom_id": "line-2", "prompt": "1"}, {"prompt": "2"})
    assert problem.line == 2
    assert problem.message == (
        "duplicate custom_id 'line-2' (first on line 1) (lines without a custom_id are named "
        "line-<n>)"
    )


def test_an_id_is_claimed_even_by_a_line_with_another_problem(tmp_path: Path) -> None:
    found = entries(tmp_path, {"custom_id": "a", "prompt": ""}, {"custom_id": "a", "prompt": "x"})
    assert found == [
        LineProblem(1, "prompt is empty"),
        LineProblem(2, "duplicate custom_id 'a' (first on line 1)"),
    ]


def test_unknown_field_in_a_simple_line(tmp_path: Path) -> None:
    assert only_problem(tmp_path, {"prompt": "a", "temprature": 0}) == LineProblem(
        1, "unknown field 'temprature'"
    )
    assert only_problem(tmp_path, {"prompt": "a", "x": 1, "y": 2}) == LineProblem(
        1, "unknown fields 'x', 'y'"
    )


def test_metadata_is_unknown_in_a_simple_line(tmp_path: Path) -> None:
    assert only_problem(tmp_path, {"prompt": "a", "metadata": {}}).message == (
        "unknown field 'metadata'"
    )


def test_unknown_field_in_an_openai_line(tmp_path: Path) -> None:
    line = openai_line()
    line["prompt"] = "x"
    assert only_problem(tmp_path, {"prompt": "ok"}, line) == LineProblem(
        2, "unknown field 'prompt' (an OpenAI batch line has only body, custom_id, method, url)"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "GET"}, "method must be 'POST', got 'GET'"),
        ({"method": "post"}, "method must be 'POST', got 'post'"),
        (
            {"url": "/v1/completions"},
            "unsupported url '/v1/completions': promptq runs '/v1/chat/completions' and "
            "'/v1/embeddings'",
        ),
        (
            {"url": 5},
            "unsupported url 5: promptq runs '/v1/chat/completions' and '/v1/embeddings'",
        ),
        ({"url": "/v1/embeddings"}, "body has no 'input'"),
        ({"body": []}, "body must be a JSON object, got an array"),
        ({"body": {"model": "m"}}, "body has no 'messages'"),
    ],
)
def test_bad_openai_lines(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    assert only_problem(tmp_path, {**openai_line(), **change}) == LineProblem(1, message)


def embeddings_line(custom_id: str = "e", /, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}


def test_embeddings_line_becomes_an_embedding_request(tmp_path: Path) -> None:
    line = embeddings_line(model="text-embedding-3-small", input="hello", dimensions=4)

    path = write_lines(tmp_path / "in.jsonl", line)
    [item] = read_items(path, model="openai/chat-model")  # the run's --model is for chat lines

    assert isinstance(item, BatchItem)
    assert item.request == EmbeddingRequest(
        input=["hello"], model="text-embedding-3-small", params={"dimensions": 4}
    )


def test_embeddings_line_without_a_model_leaves_it_to_the_workers(tmp_path: Path) -> None:
    [item] = entries(tmp_path, embeddings_line(input=["a", "b"]))

    assert isinstance(item, BatchItem)
    assert item.request == EmbeddingRequest(input=["a", "b"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": []}, "invalid request: input: List should have at least 1 item"),
        ({"input": [1]}, "texts must be a string or a list of strings"),
        ({"input": "x", "encoding_format": "base64"}, "encoding_format must be 'float'"),
        ({"input": "x", "api_key": "k"}, "cannot be set per request"),
    ],
)
def test_bad_embeddings_lines(tmp_path: Path, body: dict[str, Any], message: str) -> None:
    problem = only_problem(tmp_path, embeddings_line(**body))

    assert isinstance(problem, LineProblem)
    assert message in problem.message


@pytest.mark.parametrize("missing", ["custom_id", "method", "url", "body"])
def test_openai_line_missing_a_field(tmp_path: Path, missing: str) -> None:
    line = openai_line()
    del line[missing]
    problem = only_problem(tmp_path, line)
    assert problem.line == 1
    assert f"missing {missing}" in problem.message.replace("'", "")


@pytest.mark.parametrize(
    ("custom_id", "message"),
    [
        ("", "bad custom_id: must be a non-empty string, got ''"),
        (7, "bad custom_id: must be a non-empty string, got 7"),
        (None, "bad custom_id: must be a non-empty string, got None"),
        ("x" * 513, "bad custom_id: 513 characters, at most 512 allowed"),
        ("a\nb", "bad custom_id: 'a\\nb' contains control characters"),
        ("a\x7fb", "bad custom_id: 'a\\x7fb' contains control characters"),
    ],
)
def test_bad_custom_id_in_both_forms(tmp_path: Path, custom_id: Any, message: str) -> None:
    simple = {"custom_id": custom_id, "prompt": "hi"}
    assert only_problem(tmp_path, simple) == LineProblem(1, message)
    assert only_problem(tmp_path, openai_line(custom_id)) == LineProblem(1, message)


def test_longest_custom_id_is_accepted(tmp_path: Path) -> None:
    (item,) = entries(tmp_path, {"custom_id": "é" * 512, "prompt": "hi"})
    assert isinstance(item, BatchItem)


@pytest.mark.parametrize("name", ["stream", "api_key", "timeout", "metadata", "prompt"])
def test_reserved_param_in_an_openai_body(tmp_path: Path, name: str) -> None:
    problem = only_problem(tmp_path, openai_line(**{name: True}))
    assert problem.line == 1
    assert problem.message == (
        f"invalid request: params: parameter(s) ['{name}'] cannot be set per request: "
        "the worker owns them"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": 3}, "prompt must be a string, got int"),
        ({}, "give exactly one of prompt or messages"),
        ({"prompt": "a", "messages": []}, "give exactly one of prompt or messages"),
        ({"messages": "hi"}, "messages must be a list of {'role': ..., 'content': ...} mappings"),
        (
            {"messages": []},
            "invalid request: messages: List should have at least 1 item after validation, not 0",
        ),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "invalid request: messages: "
            "messages[0].role must be one of ['assistant', 'developer', 'function', 'system', "
            "'tool', 'user'], got 'bot'",
        ),
        ({"prompt": "a", "model": ""}, "invalid request: model must not be empty"),
    ],
)
def test_invalid_simple_requests(tmp_path: Path, line: dict[str, Any], message: str) -> None:
    assert only_problem(tmp_path, {"prompt": "fine"}, line) == LineProblem(2, message)


def test_every_problem_keeps_its_line_number(tmp_path: Path) -> None:
    found = entries(
        tmp_path,
        {"custom_id": "a", "prompt": "ok"},  # 1
        "{oops",  # 2
        "",  # 3 (blank)
        "[]",  # 4
        {"custom_id": "a", "prompt": "dup"},  # 5
        {"prompt": "x", "bogus": 1},  # 6
        {**openai_line("b"), "url": "/v1/embeddings"},  # 7 (no input)
        openai_line("c", stream=True),  # 8
        {"prompt": ""},  # 9
        openai_line("d"),  # 10
    )
    assert [(e.line, type(e).__name__) for e in found] == [
        (1, "BatchItem"),
        (2, "LineProblem"),
        (4, "LineProblem"),
        (5, "LineProblem"),
        (6, "LineProblem"),
        (7, "LineProblem"),
        (8, "LineProblem"),
        (9, "LineProblem"),
        (10, "BatchItem"),
    ]


# --- streaming --------------------------------------------------------------------------------


def test_read_items_streams_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    lines = [
        json.dumps({"custom_id": f"r{i}", "prompt": f"say {i}"}) + "\n" for i in range(100_000)
    ]
    path.write_text("".join(lines), encoding="utf-8")
    kept = 1_000
    kept_bytes = sum(len(line) for line in lines[:kept])
    assert kept_bytes > 4 * 8192  # more than read-ahead buffering can have taken

    items = read_items(path)
    assert inspect.isgenerator(items)
    first = next(items)
    assert first == BatchItem(
        1, "r0", PromptRequest(messages=[{"role": "user", "content": "say 0"}])
    )

    # Cut the file (same inode) after the first item: a lazy reader sees only what is left,
    # a reader that had taken the whole file would still yield all 100,000 items.
    with path.open("r+b") as file:
        file.truncate(kept_bytes)
    rest = list(items)
    assert len(rest) == kept - 1
    assert all(isinstance(e, BatchItem) for e in rest)


def test_problem_at_the_end_of_a_large_file_comes_after_the_items(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as file:
        for i in range(100_000):
            file.write(f'{{"prompt": "say {i}"}}\n')
        file.write("{broken\n")
    items = read_items(path)
    assert next(items) == BatchItem(
        1, "line-1", PromptRequest(messages=[{"role": "user", "content": "say 0"}])
    )
    assert inspect.isgenerator(items)
    items.close()  # abandoning the generator closes the file


# --- output -----------------------------------------------------------------------------------


def result(
    job_id: str = JOB_ID,
    message: dict[str, Any] | None = None,
    finish_reason: str | None = "stop",
) -> PromptResult:
    message = {"role": "assistant", "content": "2, 3, 5"} if message is None else message
    return PromptResult(
        id=job_id,
        model="gpt-4o-mini-2024-07-18",
        content=message.get("content"),
        message=message,
        finish_reason=finish_reason,
        usage=Usage(prompt_tokens=12, completion_tokens=5, total_tokens=17),
        cost_usd=0.000012,
        attempts=2,
        latency_s=0.81,
        created=datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
    )


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cached_prompt_tokens_are_in_openais_usage_details(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    cached = result().model_copy(
        update={
            "usage": Usage(
                prompt_tokens=1200, completion_tokens=5, total_tokens=1205, cached_tokens=1024
            )
        }
    )
    with OutputWriter(path) as writer:
        writer.write_success("q1", cached)
        writer.write_success("q2", result())
    with_cache, without = read_lines(path)
    completion = ChatCompletion.model_validate(with_cache["response"]["body"])
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 1024
    assert "prompt_tokens_details" not in without["response"]["body"]["usage"]


def test_embedding_success_line_holds_a_valid_embedding_response(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    embedded = EmbeddingResult(
        id=JOB_ID,
        model="text-embedding-3-small",
        vectors=[[0.25, -0.5], [1.0, 0.0]],
        usage=Usage(prompt_tokens=6, total_tokens=6),
        cost_usd=1.2e-7,
        attempts=1,
        latency_s=0.2,
        created=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    with OutputWriter(path) as writer:
        writer.write_success("e1", embedded)

    (line,) = read_lines(path)
    assert (line["custom_id"], line["error"], line["response"]["status_code"]) == ("e1", None, 200)
    assert line["promptq"] == {"cost_usd": 1.2e-7, "attempts": 1, "latency_s": 0.2}
    response = CreateEmbeddingResponse.model_validate(line["response"]["body"])
    assert [d.embedding for d in response.data] == embedded.vectors
    assert [d.index for d in response.data] == [0, 1]
    assert (response.model, response.usage.prompt_tokens, response.usage.total_tokens) == (
        "text-embedding-3-small",
        6,
        6,
    )
    assert read_done(path) == ({"e1"}, set())


def test_success_line_is_openai_batch_output_with_a_valid_chat_completion(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write_success("q1", result())
    (line,) = read_lines(path)
    assert line == {
        "id": "batch_req_0b6f3c3e6d4e4a519f5e2f7a3a1c9d10",
        "custom_id": "q1",
        "response": {"status_code": 200, "request_id": JOB_ID, "body": line["response"]["body"]},
        "error": None,
        "promptq": {"cost_usd": 0.000012, "attempts": 2, "latency_s": 0.81},
    }
    completion = ChatCompletion.model_validate(line["response"]["body"])
    assert completion.id == f"chatcmpl-{JOB_ID}"
    assert completion.object == "chat.completion"
    assert completion.created == int(datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    assert completion.model == "gpt-4o-mini-2024-07-18"
    (choice,) = completion.choices
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    assert choice.message.role == "assistant"
    assert choice.message.content == "2, 3, 5"
    assert completion.usage is not None
    assert completion.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
    }
    assert "promptq" not in line["response"]["body"]
    assert "cost_usd" not in json.dumps(line["response"]["body"])


def test_success_line_with_tool_calls(tmp_path: Path) -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write_success("t", result(message=message, finish_reason="tool_calls"))
        # The worker drops None fields from the message; the body still has content: null.
        without_content = {k: v for k, v in message.items() if k != "content"}
        writer.write_success("t2", result(message=without_content, finish_reason="tool_calls"))
    for line in read_lines(path):
        completion = ChatCompletion.model_validate(line["response"]["body"])
        (choice,) = completion.choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert line["response"]["body"]["choices"][0]["message"]["content"] is None
        assert choice.message.tool_calls is not None
        (call,) = choice.message.tool_calls
        assert call.model_dump(include={"id", "type", "function"}) == {
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": "{}"},
        }


@pytest.mark.parametrize(
    ("finish_reason", "message", "expected"),
    [
        (None, {"content": "x"}, "stop"),
        ("eos", {"role": "assistant", "content": "x"}, "stop"),
        ("length", {"role": "assistant", "content": "x"}, "length"),
        (
            None,
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "tool_calls",
        ),
    ],
)
def test_chat_completion_always_validates(
    tmp_path: Path, finish_reason: str | None, message: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "out.jsonl"
    naive = result(message=message, finish_reason=finish_reason).model_copy(
        update={"created": datetime(2025, 1, 1)}  # naive: taken as UTC
    )
    with OutputWriter(path) as writer:
        writer.write_success("x", naive)
    (line,) = read_lines(path)
    completion = ChatCompletion.model_validate(line["response"]["body"])
    assert completion.choices[0].finish_reason == expected
    assert completion.choices[0].message.role == "assistant"
    assert completion.created == int(datetime(2025, 1, 1, tzinfo=UTC).timestamp())


def test_failure_line_with_a_provider_status(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    error = JobError(
        kind=ErrorKind.BAD_REQUEST, message="max_tokens too large", status_code=400, attempts=1
    )
    with OutputWriter(path) as writer:
        writer.write_failure("f1", JOB_ID, error)
    (line,) = read_lines(path)
    assert line == {
        "id": "batch_req_0b6f3c3e6d4e4a519f5e2f7a3a1c9d10",
        "custom_id": "f1",
        "response": {
            "status_code": 400,
            "request_id": JOB_ID,
            "body": {
                "error": {
                    "message": "max_tokens too large",
                    "type": "bad_request",
                    "param": None,
                    "code": "bad_request",
                }
            },
        },
        "error": {"code": "bad_request", "message": "max_tokens too large"},
        "promptq": {"cost_usd": None, "attempts": 1, "latency_s": None},
    }
    ErrorObject.model_validate(line["response"]["body"]["error"])


def test_failure_line_without_a_status_or_a_job(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write_failure(
            "f1", JOB_ID, JobError(kind=ErrorKind.WORKER_LOST, message="died", attempts=3)
        )
        writer.write_failure("f2", None, JobError(kind=ErrorKind.INTERNAL, message="not sent"))
    first, second = read_lines(path)
    assert first["response"] is None
    assert first["error"] == {"code": "worker_lost", "message": "died"}
    assert first["promptq"] == {"cost_usd": None, "attempts": 3, "latency_s": None}
    assert second["response"] is None
    assert second["id"].startswith("batch_req_")
    assert len(second["id"]) == len("batch_req_") + 32


def test_non_ascii_text_survives_and_each_record_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    text = "naïve\nline\u2028two \ud800"
    with OutputWriter(path) as writer:
        writer.write_success("ü", result(message={"role": "assistant", "content": text}))
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1
    (line,) = read_lines(path)
    assert line["custom_id"] == "ü"
    assert line["response"]["body"]["choices"][0]["message"]["content"] == text


def test_writer_appends_and_writes_each_line_at_once(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write_success("a", result())
        assert path.read_bytes().endswith(b"\n")  # flushed before close
    with OutputWriter(path, fsync_every=1) as writer:
        writer.write_success("b", result())
    assert [line["custom_id"] for line in read_lines(path)] == ["a", "b"]


def test_writer_refuses_writes_after_close(tmp_path: Path) -> None:
    writer = OutputWriter(tmp_path / "out.jsonl")
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write_success("a", result())


def test_partial_last_line_is_truncated_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write_success("a", result())
    whole = path.read_bytes()
    with path.open("ab") as file:
        file.write(b'{"id": "batch_req_x", "custom_id": "b", "resp')  # a crash mid-write
    with OutputWriter(path) as writer:
        assert writer.trimmed_bytes == len(b'{"id": "batch_req_x", "custom_id": "b", "resp')
        assert path.read_bytes() == whole
        writer.write_failure("b", None, JobError(kind=ErrorKind.TIMEOUT, message="slow"))
    assert [line["custom_id"] for line in read_lines(path)] == ["a", "b"]


def test_a_file_that_is_only_a_partial_line_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"x" * 200_000)  # longer than one backward-scan chunk
    with OutputWriter(path) as writer:
        assert writer.trimmed_bytes == 200_000
    assert path.read_bytes() == b""


def test_partial_line_after_a_long_complete_one(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    long_line = b"y" * 150_000 + b"\n"
    path.write_bytes(long_line + b"z" * 100_000)
    with OutputWriter(path) as writer:
        assert writer.trimmed_bytes == 100_000
    assert path.read_bytes() == long_line


def test_complete_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        assert writer.trimmed_bytes == 0
        writer.write_success("a", result())
    before = path.read_bytes()
    with OutputWriter(path) as writer:
        assert writer.trimmed_bytes == 0
    assert path.read_bytes() == before


# --- read_done --------------------------------------------------------------------------------


def test_read_done_of_a_missing_file(tmp_path: Path) -> None:
    assert read_done(tmp_path / "nope.jsonl") == (set(), set())


def test_read_done_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    timeout = JobError(kind=ErrorKind.TIMEOUT, message="slow", attempts=4)
    refused = JobError(kind=ErrorKind.BAD_REQUEST, message="no", status_code=400, attempts=1)
    with OutputWriter(path) as writer:
        writer.write_success("ok1", result())
        writer.write_failure("late", "job-2", timeout)
        writer.write_failure("bad", "job-3", refused)
        writer.write_success("ok2", result(job_id="job-4"))
        writer.write_success("late", result(job_id="job-5"))  # failed, then succeeded on retry
    assert read_done(path) == ({"ok1", "ok2", "late"}, {"bad"})


def test_read_done_succeeded_wins_whatever_the_order(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write_success("a", result())
        writer.write_failure("a", None, JobError(kind=ErrorKind.TIMEOUT, message="slow"))
    assert read_done(path) == ({"a"}, set())


def test_read_done_ignores_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write_success("a", result())
    record = path.read_bytes().replace(b'"a"', b'"b"')
    with path.open("ab") as file:
        file.write(b"\n")  # a blank line is skipped
        file.write(record.rstrip(b"\n"))  # complete JSON, but no newline: not finished
    assert read_done(path) == ({"a"}, set())
    with path.open("ab") as file:
        file.write(b'{"custom_id": "c", "resp')
    assert read_done(path) == ({"a"}, set())


def test_read_done_refuses_a_file_that_is_not_output(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", {"custom_id": "a", "prompt": "hi"})
    with pytest.raises(OutputFormatError, match=r"line 1: not a batch output line"):
        read_done(path)
    path.write_text("not json\n", encoding="utf-8")
    with pytest.raises(OutputFormatError, match=r"line 1: not a JSON line"):
        read_done(path)


def test_read_done_accepts_openai_batch_output(tmp_path: Path) -> None:
    # A line as OpenAI writes it for a request that got an HTTP error: error null, status 400.
    openai_failure = {
        "id": "batch_req_1",
        "custom_id": "x",
        "response": {"status_code": 400, "request_id": "r", "body": {"error": {}}},
        "error": None,
    }
    path = write_lines(tmp_path / "out.jsonl", openai_failure)
    assert read_done(path) == (set(), {"x"})


def test_importing_the_batch_file_formats_loads_neither_litellm_nor_celery() -> None:
    code = (
        "import sys, worker.batch.input, worker.batch.output; "
        "print(sorted(m for m in ('litellm', 'celery') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
