"""The fake provider's Files and Batches, driven over real HTTP on 127.0.0.1 through LiteLLM's
files and batches API (what promptq's batch tier calls)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import litellm
import openai
import pytest

from worker.fake_provider import FakeProvider, FakeProviderConfig, main

KEY = "sk-fake-batches"


def chat_line(n: int) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": f"question {n}"}]}
    return {"custom_id": f"job-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture
def provider(request: pytest.FixtureRequest) -> Iterator[FakeProvider]:
    config = getattr(request, "param", FakeProviderConfig(batch_delay_s=0.3))
    with FakeProvider(config) as fp:
        yield fp


def common(fp: FakeProvider) -> dict[str, Any]:
    return {"custom_llm_provider": "openai", "api_base": fp.base_url, "api_key": KEY}


def create(fp: FakeProvider, lines: list[dict[str, Any]]) -> Any:
    upload = litellm.create_file(file=("in.jsonl", jsonl(lines)), purpose="batch", **common(fp))
    return litellm.create_batch(
        completion_window="24h",
        endpoint="/v1/chat/completions",
        input_file_id=upload.id,
        **common(fp),
    )


def run_batch(fp: FakeProvider, lines: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """Upload, create, poll until it ends; (the batch, {custom_id: output or error line})."""
    batch = create(fp, lines)
    deadline = time.monotonic() + 10
    while batch.status not in ("completed", "expired", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)  # polling a provider batch, as a client does
        batch = litellm.retrieve_batch(batch_id=batch.id, **common(fp))
    rows: dict[str, Any] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            content = litellm.file_content(file_id=file_id, **common(fp))
            for raw in content.content.decode().splitlines():
                row = json.loads(raw)
                rows[row["custom_id"]] = row
    return batch, rows


def test_a_batch_answers_every_line_after_its_delay(provider: FakeProvider) -> None:
    started = time.monotonic()
    batch, rows = run_batch(provider, [chat_line(n) for n in range(5)])
    assert time.monotonic() - started >= 0.3
    assert batch.status == "completed"
    assert batch.request_counts.total == 5 and batch.request_counts.completed == 5
    assert sorted(rows) == [f"job-{n}" for n in range(5)]
    for n in range(5):
        response = rows[f"job-{n}"]["response"]
        assert response["status_code"] == 200
        assert response["body"]["choices"][0]["message"]["content"] == f"echo: question {n}"
        assert response["body"]["usage"]["prompt_tokens"] > 0
    assert batch.error_file_id is None


@pytest.mark.parametrize(
    "provider",
    [FakeProviderConfig(batch_delay_s=0, batch_failure_rate=0.2, batch_expired_share=0.2)],
    indirect=True,
)
def test_lines_fail_or_expire_in_the_shares_configured(provider: FakeProvider) -> None:
    batch, rows = run_batch(provider, [chat_line(n) for n in range(200)])
    assert batch.status == "expired"
    assert len(rows) == 200  # every line is in the output or the error file
    failed = [r for r in rows.values() if r["response"] and r["response"]["status_code"] == 500]
    expired = [r for r in rows.values() if r["error"] and r["error"]["code"] == "batch_expired"]
    assert 20 <= len(failed) <= 60 and 20 <= len(expired) <= 60
    assert batch.request_counts.failed == len(failed)
    assert batch.request_counts.completed == 200 - len(failed) - len(expired)


@pytest.mark.parametrize("provider", [FakeProviderConfig(batch_delay_s=60)], indirect=True)
def test_a_batch_cancelled_in_progress_answers_nothing(provider: FakeProvider) -> None:
    batch = create(provider, [chat_line(1)])
    assert batch.status == "in_progress"
    cancelling = litellm.cancel_batch(batch_id=batch.id, **common(provider))
    assert cancelling.status == "cancelling"
    batch = litellm.retrieve_batch(batch_id=batch.id, **common(provider))
    assert batch.status == "cancelled"
    assert batch.output_file_id is None


def test_a_batch_of_bad_lines_is_refused_naming_the_line(provider: FakeProvider) -> None:
    bad = chat_line(2) | {"url": "/v1/embeddings"}
    with pytest.raises(openai.BadRequestError, match="line 2"):
        run_batch(provider, [chat_line(1), bad])


def test_batch_shares_that_cannot_both_hold_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError, match="batch_failure_rate"):
        FakeProviderConfig(batch_failure_rate=0.7, batch_expired_share=0.5)
    shares = ["--batch-failure-rate", "0.7", "--batch-expired-share", "0.5", "--port", "0"]
    assert main(shares) == 2
    assert "batch_expired_share" in capsys.readouterr().err
