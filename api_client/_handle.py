"""JobHandle: what Job and AsyncJob share (the id, the latest poll's finding, the result)."""

from __future__ import annotations

from typing import Generic, cast

from typing_extensions import TypeVar

from ._polling import unwrap
from ._schemas import JobStatus, Outcome, PromptResult

# The result a job's handle returns: a PromptResult unless it was made by embed().
ResultT = TypeVar("ResultT", default=PromptResult)


class JobHandle(Generic[ResultT]):
    """What Job and AsyncJob share: the id, and what the latest poll found.

    ``ResultT`` is the type of the job's result: PromptResult for a prompt, EmbeddingResult
    for embed(); Any where the handle does not know (Client.job, submit_many).
    """

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self._outcome: Outcome | None = None
        self.last_status: JobStatus | None = None  # as seen by the latest poll

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    def _result(self) -> ResultT:
        """The result of the finished job, or its error raised as JobFailed."""
        assert self._outcome is not None
        return cast(ResultT, unwrap(self.id, self._outcome))

    def _settle(self, found: Outcome | JobStatus) -> bool:
        """Record what a poll found; True when the job has finished."""
        if isinstance(found, Outcome):
            self._outcome = found
            self.last_status = found.status
            return True
        self.last_status = found
        return False
