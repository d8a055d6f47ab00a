"""`promptq batch` end to end: embedded and against a real fleet, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from tests.support.e2e_worker import CANARY_KEY
from tests.support.openai_server import Reply, ScriptedOpenAIServer, echo_vectors, same_vectors
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

WAIT_S = 60.0


def write_input(path: Path, count: int, *, extra: list[dict[str, Any]] | None = None) -> None:
    lines = [{"custom_id": f"q{i}", "prompt": f"question {i}"} for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines + (extra or [])))


def batch_env(base_url: str, redis_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_"))}
    env |= {"LLM_MODEL": "openai/test-model", "LLM_API_KEY": CANARY_KEY, "LLM_BASE_URL": base_url}
    env |= {"LLM_RETRY_MIN_WAIT": "0.05", "LLM_RETRY_MAX_WAIT": "0.2", "LLM_TIMEOUT": "2"}
    if redis_url is not None:
        env["PROMPTQ_REDIS_URL"] = redis_url
    return env


def batch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", "batch", *args]


def run_batch(cwd: Path, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        batch_command(*args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


def output_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompts_sent(provider: ScriptedOpenAIServer) -> list[str]:
    return [request.body["messages"][-1]["content"] for request in provider.requests]


def check_output(path: Path, expected_ids: list[str]) -> list[dict[str, Any]]:
    lines = output_lines(path)
    assert Counter(line["custom_id"] for line in lines) == Counter(expected_ids)
    for line in lines:
        if line["error"] is None and line["response"]["body"].get("object") != "list":
            ChatCompletion.model_validate(line["response"]["body"])
    return lines


def test_embedded_batch_answers_every_line_once(
    tmp_path: Path, provider: ScriptedOpenAIServer
) -> None:
    write_input(tmp_path / "in.jsonl", 60, extra=[{"custom_id": "refused", "prompt": "no"}])
    # One at a time, in input order: a 429 on the first line, then the last line refused.
    provider.script(Reply(status=429, headers={"Retry-After": "0.1"}))
    provider.script(*[Reply() for _ in range(60)], Reply(status=400))

    completed = run_batch(
        tmp_path,
        batch_env(provider.base_url),
        "in.jsonl",
        "-o",
        "out.jsonl",
        "--max-in-flight",
        "1",
    )

    assert completed.returncode == 1, completed.stderr  # one prompt failed
    assert "running embedded" in completed.stderr
    assert "bad_request: 1" in completed.stderr
    lines = check_output(tmp_path / "out.jsonl", [f"q{i}" for i in range(60)] + ["refused"])
    [refused] = [line for line in lines if line["custom_id"] == "refused"]
    assert refused["error"]["code"] == "bad_request"
    assert CANARY_KEY not in completed.stderr + (tmp_path / "out.jsonl").read_text()


def test_embeddings_lines_run_beside_chat_lines(
    tmp_path: Path, provider: ScriptedOpenAIServer
) -> None:
    texts = {f"e{i}": [f"text {i}", f"another text {i}"] for i in range(5)}
    embeddings = [
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "openai/text-embedding-3-small", "input": inputs},
        }
        for custom_id, inputs in texts.items()
    ]
    write_input(tmp_path / "in.jsonl", 5, extra=embeddings)

    completed = run_batch(
        tmp_path, batch_env(provider.base_url), "in.jsonl", "-o", "out.jsonl", "--json"
    )

    assert completed.returncode == 0, completed.stderr
    lines = check_output(tmp_path / "out.jsonl", [f"q{i}" for i in range(5)] + list(texts))
    for line in lines:
        if line["custom_id"] in texts:
            response = CreateEmbeddingResponse.model_validate(line["response"]["body"])
            vectors = [d.embedding for d in response.data]
            assert same_vectors(vectors, echo_vectors(texts[line["custom_id"]]))
            assert line["promptq"]["cost_usd"] > 0  # LiteLLM prices text-embedding-3-small
    paths = Counter(request.path for request in provider.requests)
    assert paths == {"/v1/chat/completions": 5, "/v1/embeddings": 5}
    summary = json.loads(completed.stdout)
    assert summary["succeeded"] == 10
    assert summary["prompt_tokens"] >= 10  # both kinds' tokens are counted


def test_malformed_lines_are_reported_and_nothing_is_submitted(
    tmp_path: Path, provider: ScriptedOpenAIServer
) -> None:
    good = json.dumps({"custom_id": "a", "prompt": "fine"})
    (tmp_path / "in.jsonl").write_text(
        f"{good}\n{{not json\n{good}\n" + json.dumps({"prompt": "x", "colour": "red"}) + "\n"
    )

    completed = run_batch(tmp_path, batch_env(provider.base_url), "in.jsonl", "-o", "out.jsonl")

    assert completed.returncode == 2
    assert "line 2:" in completed.stderr
    assert "line 3:" in completed.stderr and "duplicate" in completed.stderr
    assert "line 4:" in completed.stderr and "colour" in completed.stderr
    assert "nothing was submitted" in completed.stderr
    assert provider.requests == []
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_batch_through_a_fleet_only_collects(
    tmp_path: Path,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
) -> None:
    write_input(tmp_path / "in.jsonl", 100)
    env = batch_env("http://127.0.0.1:1/v1", redis_server.url)  # only the fleet calls out

    completed = run_batch(tmp_path, env, "in.jsonl", "-o", "out.jsonl", "--json")

    assert completed.returncode == 0, completed.stderr
    assert "embedded" not in completed.stderr
    check_output(tmp_path / "out.jsonl", [f"q{i}" for i in range(100)])
    assert json.loads(completed.stdout)["succeeded"] == 100
    assert len(provider.requests) == 100  # the fleet's worker made every call


def test_resume_after_kill_sends_no_answered_prompt_again(
    tmp_path: Path, provider: ScriptedOpenAIServer
) -> None:
    write_input(tmp_path / "in.jsonl", 80)
    out = tmp_path / "out.jsonl"
    provider.default = Reply(delay_s=0.05)
    first = subprocess.Popen(
        batch_command("in.jsonl", "-o", "out.jsonl", "--max-in-flight", "4", "-q"),
        cwd=tmp_path,
        env=batch_env(provider.base_url),
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while not out.exists() or out.read_text().count("\n") < 20:
            assert first.poll() is None, "the batch finished before it could be killed"
            assert time.monotonic() < deadline, "no progress before the deadline"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=WAIT_S)
    answered = {line["custom_id"] for line in output_lines_tolerant(out)}
    assert 20 <= len(answered) < 80
    provider.reset()

    second = run_batch(tmp_path, batch_env(provider.base_url), "in.jsonl", "-o", "out.jsonl")

    assert second.returncode == 0, second.stderr
    check_output(out, [f"q{i}" for i in range(80)])
    resent = {p.removeprefix("question ") for p in prompts_sent(provider)}
    assert not resent & {custom_id.removeprefix("q") for custom_id in answered}


def output_lines_tolerant(path: Path) -> list[dict[str, Any]]:
    """The complete lines of an output a killed run may have left with a partial last line."""
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def test_embedded_batch_runs_without_redis_installed(
    tmp_path: Path, provider: ScriptedOpenAIServer
) -> None:
    # A PATH without redis-server: the command falls back to its in-process fakeredis server.
    write_input(tmp_path / "in.jsonl", 12)
    provider.script(Reply(status=429, headers={"Retry-After": "0.2"}), Reply(status=503))
    env = batch_env(provider.base_url) | {"PATH": str(Path(sys.executable).parent)}

    completed = run_batch(tmp_path, env, "in.jsonl", "-o", "out.jsonl", "--max-in-flight", "1")

    assert completed.returncode == 0, completed.stderr
    assert "fakeredis" in completed.stderr
    lines = check_output(tmp_path / "out.jsonl", [f"q{i}" for i in range(12)])
    assert lines[0]["custom_id"] == "q0" and lines[0]["promptq"]["attempts"] == 3
    assert len(provider.requests) == 14  # 12 prompts, one of them tried three times


def test_embedded_batch_serves_no_metrics(tmp_path: Path, provider: ScriptedOpenAIServer) -> None:
    """PROMPTQ_METRICS_PORT set for the workers of this machine does not concern the command:
    its port being taken by one of them stops nothing."""
    write_input(tmp_path / "in.jsonl", 2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = batch_env(provider.base_url) | {"PROMPTQ_METRICS_PORT": str(taken.getsockname()[1])}

        completed = run_batch(tmp_path, env, "in.jsonl", "-o", "out.jsonl")

    assert completed.returncode == 0, completed.stderr
    assert "metrics" not in completed.stderr
    check_output(tmp_path / "out.jsonl", ["q0", "q1"])
