"""One provider call from a test, made as the worker makes it: worker.llm.call.acall on a loop."""

from __future__ import annotations

from api_client._schemas import EmbeddingRequest, PromptRequest
from worker.attempt.call_loop import CallLoop
from worker.llm.answers import Completion, Embedding
from worker.llm.call import acall
from worker.settings import LLMSettings

# One loop for every test's calls, as a worker process has one: LiteLLM keeps its HTTP clients
# per loop.
_LOOP = CallLoop(concurrency=16)


def complete(settings: LLMSettings, request: PromptRequest) -> Completion:
    """Returns the completion of one call; raises what the call raised."""
    answer = _call(settings, request)
    assert isinstance(answer, Completion)
    return answer


def embed(settings: LLMSettings, request: EmbeddingRequest) -> Embedding:
    """Returns the embeddings of one call; raises what the call raised."""
    answer = _call(settings, request)
    assert isinstance(answer, Embedding)
    return answer


def _call(settings: LLMSettings, request: PromptRequest | EmbeddingRequest) -> object:
    [answer] = _LOOP.run([acall(settings, request)])
    if isinstance(answer, BaseException):
        raise answer
    return answer
