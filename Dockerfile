# A promptq worker. Settings come from LLM_* / PROMPTQ_* environment variables, or from a
# config.toml mounted at /app/config.toml (or named by PROMPTQ_CONFIG).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin promptq

WORKDIR /src
COPY pyproject.toml README.md ./
COPY api_client/ api_client/
COPY worker/ worker/
# With Flower (the `flower` extra): docker-compose.yml runs it from this image too.
RUN pip install --no-cache-dir ".[flower]" && rm -rf /src

# The worker reads ./config.toml when present: run from a directory the user owns.
WORKDIR /app
RUN chown promptq:promptq /app
USER promptq

# Celery shuts down warm on SIGTERM: it finishes the calls in flight, and jobs it had not
# acknowledged return to the queue.
CMD ["promptq", "worker"]
