"""Every exception the client raises, rooted at PromptqError.

PromptqError                 anything promptq raises; catch this to catch them all
├── InvalidRequest           bad input, found before anything is queued (also a ValueError)
├── BrokerUnavailable        Redis could not be reached in time (also a ConnectionError)
├── JobNotFound              no job with that id, or its result has expired (also a LookupError)
├── JobTimeout               wait() ran out of time; the job goes on (also a TimeoutError)
└── JobFailed                the job ended in a structured error: .kind, .status_code, ...
                             (cancelled and expired jobs too: kind cancelled, deadline_exceeded)
"""

from __future__ import annotations


class PromptqError(Exception):
    """Root of every exception the promptq client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(PromptqError, ValueError):
    """The request is malformed; nothing was queued."""


class BrokerUnavailable(PromptqError, ConnectionError):
    """Redis (the broker and result store) could not be reached within the configured time."""


class JobNotFound(PromptqError, LookupError):
    """No job with this id exists, or its result has expired."""

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobTimeout(PromptqError, TimeoutError):
    """The job did not finish within the time given to wait(); it keeps running."""

    def __init__(self, message: str, *, job_id: str | None, timeout_s: float) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.timeout_s = timeout_s


class JobFailed(PromptqError):
    """The job ended with an error.

    ``kind`` says what went wrong (``rate_limited``, ``bad_request``, ... see ErrorKind),
    ``status_code`` is the provider's HTTP status when there was one, and ``attempts`` is the
    number of provider calls made. A cancelled job, or one whose deadline passed, fails too:
    ``kind`` is ``cancelled`` or ``deadline_exceeded``.
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: str,
        kind: str,
        status_code: int | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.kind = kind
        self.status_code = status_code
        self.attempts = attempts

    def __str__(self) -> str:
        return f"job {self.job_id} failed ({self.kind}): {self.message}"
