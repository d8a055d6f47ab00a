"""Every exception the worker raises of its own, and the exit statuses of `promptq worker`.

WorkerError                    anything the worker raises of its own
├── ConfigError                a setting is missing or invalid: the worker does not start
├── MetricsPortTaken           the metrics server cannot listen where the settings say
├── OutputFormatError          a batch output file holds a line that is not one (also a ValueError)
├── BudgetExceeded             a spending cap leaves no room for this call: the job fails
└── AttemptProblem             an attempt failed in a way promptq recognised (classified as
    │                          worker.attempt.classify says, like the provider's own errors)
    ├── NotConfigured          the worker lacks what it needs to call this model
    ├── MalformedResponse      the provider's answer is not a usable completion
    ├── ContextWindowExceeded  the prompt (plus max_tokens) does not fit the model
    │   └── PromptTooLong      the prompt is longer than LLM_MAX_INPUT_TOKENS: no call made
    └── ContentPolicyViolation the provider refused the prompt or the answer

Redis being unreachable is not one of these: the worker meets it as redis-py's and kombu's own
exceptions (REDIS_UNAVAILABLE), and gives the message back to the queue.
"""

from __future__ import annotations

from typing import ClassVar

import redis
from kombu.exceptions import OperationalError

# What `promptq worker` exits with: 2 for a bad setting (restarting cannot help), 1 when its
# processes kept dying.
EXIT_CRASH_LOOP = 1
EXIT_USAGE = 2

# Redis cannot be reached right now: a script call's own errors, and the broker connection's.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
REDIS_UNAVAILABLE = (*REDIS_DOWN, OperationalError)


class WorkerError(Exception):
    """Root of every exception the worker raises of its own."""


class ConfigError(WorkerError):
    """A setting is missing or invalid; the message names each offending key."""


class MetricsPortTaken(WorkerError):
    """The metrics server cannot listen where PROMPTQ_METRICS_HOST/PORT say."""


class OutputFormatError(WorkerError, ValueError):
    """An existing output file holds a line that is not a promptq batch output line."""


class BudgetExceeded(WorkerError):
    """A spending cap leaves no room for this call."""


class AttemptProblem(WorkerError):
    """A failed attempt that promptq itself recognised (before, during or after the call)."""

    # Raised before any request was sent: not an attempt (it spends no retry, counts no call).
    before_call: ClassVar[bool] = False

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class NotConfigured(AttemptProblem):
    """The worker is missing what it needs to call this model (model name, API key...)."""

    before_call = True


class MalformedResponse(AttemptProblem):
    """The provider answered with a body that is not a usable completion."""


class ContextWindowExceeded(AttemptProblem):
    """The prompt (plus max_tokens) does not fit the model's context window."""


class PromptTooLong(ContextWindowExceeded):
    """The prompt is longer than LLM_MAX_INPUT_TOKENS allows; found before the call."""

    before_call = True


class ContentPolicyViolation(AttemptProblem):
    """The provider refused the prompt or the answer on content-policy grounds."""
