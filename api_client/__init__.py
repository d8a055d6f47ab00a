"""promptq's client: submit prompts to the worker fleet and collect results (no LiteLLM here).

>>> from api_client import Client
>>> with Client("redis://localhost:6379/0") as client:
...     job = client.submit("Name three prime numbers.", temperature=0)
...     print(job.wait(timeout=120).content)
"""

from ._async_client import AsyncClient, AsyncJob
from ._cancel import Cancellation, CancelResult
from ._celery_contract import CONTRACT_VERSION as CELERY_CONTRACT_VERSION
from ._client import Client, Job
from ._constants import EMBED_TASK_NAME, QUEUE, TASK_NAME
from ._errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PromptqError,
)
from ._schemas import (
    EmbeddingRequest,
    EmbeddingResult,
    ErrorKind,
    JobError,
    JobStatus,
    Priority,
    PromptRequest,
    PromptResult,
    Usage,
)
from ._settings import ClientSettings

__all__ = [
    "CELERY_CONTRACT_VERSION",
    "EMBED_TASK_NAME",
    "QUEUE",
    "TASK_NAME",
    "AsyncClient",
    "AsyncJob",
    "BrokerUnavailable",
    "CancelResult",
    "Cancellation",
    "Client",
    "ClientSettings",
    "EmbeddingRequest",
    "EmbeddingResult",
    "ErrorKind",
    "InvalidRequest",
    "Job",
    "JobError",
    "JobFailed",
    "JobNotFound",
    "JobStatus",
    "JobTimeout",
    "Priority",
    "PromptRequest",
    "PromptResult",
    "PromptqError",
    "Usage",
]
