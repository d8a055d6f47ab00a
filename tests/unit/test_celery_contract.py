"""The public Celery contract's translation: a task's arguments read into the request Client.submit
would have made, and every bad shape refused naming the problem."""

from __future__ import annotations

import time
from typing import Any

import pytest

from api_client import EmbeddingRequest, InvalidRequest, Priority, PromptRequest
from api_client._celery_contract import request_from_task, task_arguments_problem
from api_client._constants import EMBED_TASK_NAME, TASK_NAME
from api_client._requests import build_embedding_request, build_request


def test_a_prompt_with_options_reads_as_submit_would_build_it() -> None:
    sent = {
        "prompt": "hello",
        "model": "openai/gpt-4o",
        "temperature": 0,
        "max_tokens": 20,
        "llm": "cheap",
        "budget": "team-a-budget",
        "priority": "interactive",
        "tenant": "team-a",
    }

    request = request_from_task(TASK_NAME, sent)

    assert request == build_request(
        "hello",
        None,
        "openai/gpt-4o",
        {"temperature": 0, "max_tokens": 20},
        llm="cheap",
        budget="team-a-budget",
        priority="interactive",
        tenant="team-a",
    )
    assert request.priority is Priority.INTERACTIVE


def test_promptqs_own_request_json_reads_back_as_itself() -> None:
    own = PromptRequest(
        messages=[{"role": "user", "content": "x"}],
        params={"top_p": 0.5},
        priority=Priority.BATCH,
        tenant="t",
        deadline_at=2_000_000_000.0,
    )
    embedding = EmbeddingRequest(input=["a", "b"], params={"dimensions": 4}, llm="emb")

    assert request_from_task(TASK_NAME, own.model_dump(mode="json")) == own
    assert request_from_task(EMBED_TASK_NAME, embedding.model_dump(mode="json")) == embedding


def test_parameters_may_sit_beside_the_fields_or_in_params() -> None:
    request = request_from_task(
        TASK_NAME, {"messages": [{"role": "user", "content": "x"}], "seed": 1, "params": {"n": 1}}
    )
    assert request.params == {"seed": 1, "n": 1}


def test_an_embedding_request_takes_a_text_or_texts() -> None:
    assert request_from_task(EMBED_TASK_NAME, {"input": "one", "dimensions": 8}) == (
        build_embedding_request("one", None, {"dimensions": 8})
    )


def test_deadlines_are_absolute_once_read() -> None:
    before = time.time()
    relative = request_from_task(TASK_NAME, {"prompt": "x", "deadline_s": 30})
    absolute = request_from_task(TASK_NAME, {"prompt": "x", "deadline_at": 2_000_000_000})

    assert relative.deadline_at is not None and before + 30 <= relative.deadline_at
    assert relative.deadline_at <= time.time() + 30
    assert absolute.deadline_at == 2_000_000_000


@pytest.mark.parametrize(
    ("task", "sent", "named"),
    [
        (TASK_NAME, ["hello"], "must be a JSON object with prompt or messages, got list"),
        (EMBED_TASK_NAME, "text", "must be a JSON object with input, got str"),
        (TASK_NAME, {}, "give exactly one of prompt or messages"),
        (TASK_NAME, {"prompt": "  "}, "prompt is empty"),
        (TASK_NAME, {"prompt": "x", "api_key": "sk-1"}, "['api_key'] cannot be set per request"),
        (TASK_NAME, {"prompt": "x", "priority": "high"}, "priority must be one of"),
        (TASK_NAME, {"prompt": "x", "tenant": "a b"}, "tenant must match"),
        (TASK_NAME, {"prompt": "x", "deadline_s": -1}, "deadline_s must be a finite number"),
        (TASK_NAME, {"prompt": "x", "deadline": 5, "deadline_at": 5}, "at most one of deadline"),
        (TASK_NAME, {"prompt": "x", "idempotency_key": "k"}, "the task id names the job"),
        (TASK_NAME, {"prompt": "x", "params": [1]}, "params must be an object"),
        (TASK_NAME, {"prompt": "x", "seed": 1, "params": {"seed": 2}}, "['seed'] given both"),
        (EMBED_TASK_NAME, {"input": ["ok", ""]}, "input[1] is empty"),
        ("promptq.other", {"prompt": "x"}, "unknown task 'promptq.other'"),
    ],
)
def test_a_bad_request_is_refused_naming_the_problem(task: str, sent: Any, named: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        request_from_task(task, sent)
    assert named in raised.value.message


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ([], {}, "takes one positional argument, the request (a JSON object), got 0"),
        ([{"prompt": "x"}, {}], {}, "got 2"),
        ([{"prompt": "x"}], {"temperature": 0}, "takes no keyword arguments (got ['temperature'])"),
    ],
)
def test_task_arguments_other_than_one_request_are_named(
    args: list[Any], kwargs: dict[str, Any], named: str
) -> None:
    problem = task_arguments_problem(TASK_NAME, args, kwargs)
    assert problem is not None and named in problem
    assert task_arguments_problem(TASK_NAME, [{"prompt": "x"}], {}) is None
