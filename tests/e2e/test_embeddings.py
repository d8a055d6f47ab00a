"""Embeddings end to end: client.embed() through a real worker and LiteLLM over HTTP."""

from __future__ import annotations

import asyncio

import pytest

from api_client import (
    AsyncClient,
    Client,
    EmbeddingRequest,
    EmbeddingResult,
    JobFailed,
    PromptResult,
)
from tests.support.e2e_worker import CANARY_KEY, module_worker
from tests.support.invariants import dump_redis
from tests.support.openai_server import Reply, ScriptedOpenAIServer, echo_vectors, same_vectors
from tests.support.redis_server import RedisServer
from tests.support.threads import off_main_thread
from tests.support.worker_process import WorkerProcess
from worker.fake_provider.replies import estimate_tokens
from worker.fleet.limiter_status import read_limiters

EMBEDDING_MODEL = "openai/text-embedding-3-small"
PRICE_PER_TOKEN = 2e-8  # LiteLLM's price of text-embedding-3-small
WAIT_S = 60.0


worker = module_worker(
    env={"LLM_EMBEDDING_MODEL": EMBEDDING_MODEL},
    args=("--concurrency", "8"),
    directory="embeddings",
)


def test_embed_returns_one_vector_per_text_with_usage_and_cost(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    texts = ["the first text", "a second, longer text to embed", "third"]

    result = client.embed(texts).wait(timeout=WAIT_S)

    assert isinstance(result, EmbeddingResult)
    assert same_vectors(result.vectors, echo_vectors(texts))
    tokens = estimate_tokens(texts)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (tokens, 0)
    assert result.cost_usd == pytest.approx(tokens * PRICE_PER_TOKEN)
    assert (result.attempts, result.model) == (1, "text-embedding-3-small")
    [request] = provider.requests
    assert request.path == "/v1/embeddings"
    assert request.body["model"] == "text-embedding-3-small"  # LLM_EMBEDDING_MODEL
    assert request.body["input"] == texts
    assert request.headers["authorization"] == f"Bearer {CANARY_KEY}"


def test_a_single_text_a_model_and_parameters_per_call(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    job = client.embed("just one", model="openai/text-embedding-3-large", dimensions=4)

    result = job.wait(timeout=WAIT_S)

    assert same_vectors(result.vectors, echo_vectors(["just one"], 4))
    [request] = provider.requests
    assert request.body["model"] == "text-embedding-3-large"
    assert (request.body["input"], request.body["dimensions"]) == (["just one"], 4)


def test_rate_limits_and_outages_are_retried_like_completions(
    client: Client, provider: ScriptedOpenAIServer, redis_server: RedisServer
) -> None:
    provider.script(Reply(429, headers={"Retry-After": "0.1"}), Reply(503))

    result = client.embed(["retried"]).wait(timeout=WAIT_S)

    assert result.attempts == 3
    assert same_vectors(result.vectors, echo_vectors(["retried"]))
    assert [r.path for r in provider.requests] == ["/v1/embeddings"] * 3
    # The calls went through the fleet's limiter for the embedding model's deployment.
    [limiter] = [s for s in read_limiters(redis_server.client()) if s.model == EMBEDDING_MODEL]
    assert limiter.requests_per_minute == pytest.approx(3, abs=0.2)
    assert limiter.rate_limited_per_minute == pytest.approx(1, abs=0.2)


def test_a_refused_request_fails_after_one_call(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    provider.script(Reply(400))

    with pytest.raises(JobFailed) as raised:
        client.embed(["refused"]).wait(timeout=WAIT_S)

    assert (raised.value.kind, raised.value.attempts, raised.value.status_code) == (
        "bad_request",
        1,
        400,
    )
    assert len(provider.requests) == 1


def test_a_spent_budget_refuses_embeddings_without_a_call(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    budget = client.create_budget(0.0)

    with pytest.raises(JobFailed) as raised:
        client.embed(["too dear"], budget=budget).wait(timeout=WAIT_S)

    assert (raised.value.kind, raised.value.attempts) == ("budget_exceeded", 0)
    assert provider.requests == []


def test_embeddings_and_prompts_mix_in_one_submit_many(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    jobs = client.submit_many(["a prompt", EmbeddingRequest(input=["a text"])])

    answer, vectors = (job.wait(timeout=WAIT_S) for job in jobs)
    assert isinstance(answer, PromptResult)
    assert answer.content == "echo: a prompt"
    assert isinstance(vectors, EmbeddingResult)
    assert same_vectors(vectors.vectors, echo_vectors(["a text"]))
    assert sorted(r.path for r in provider.requests) == ["/v1/chat/completions", "/v1/embeddings"]


def test_async_client_embeds(redis_server: RedisServer, worker: WorkerProcess) -> None:
    async def run() -> EmbeddingResult:
        async with AsyncClient(redis_server.url) as client:
            job = await client.embed(["from asyncio"])
            return await job.wait(timeout=WAIT_S)

    result = off_main_thread(lambda: asyncio.run(run()))

    assert same_vectors(result.vectors, echo_vectors(["from asyncio"]))


def test_texts_and_vectors_stay_out_of_logs_and_the_key_out_of_redis(
    client: Client, worker: WorkerProcess, redis_server: RedisServer
) -> None:
    client.embed(["secretive text 41b7"]).wait(timeout=WAIT_S)

    assert "secretive text 41b7" not in worker.log()
    assert CANARY_KEY.encode() not in dump_redis(redis_server)
    assert CANARY_KEY not in worker.log()
