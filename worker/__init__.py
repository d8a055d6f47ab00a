"""promptq's worker side: the Celery app, the task, retries, and the one LiteLLM call."""
