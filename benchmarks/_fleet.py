"""The benchmarks' fleet: a fresh redis-server, the fake provider and warmed-up worker processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from api_client import Client
from worker.app.embedded import RedisServerProcess
from worker.fake_provider import FakeProvider, FakeProviderConfig

MODEL = "openai/bench-model"  # what the benchmarks' prompts ask for (the workers' LLM_MODEL)
WARM_UP_MODEL = "openai/warm-up"  # the warm-up's, under no limit of the workers'
WARM_UP_TIMEOUT_S = 120.0
# A busy machine's other load: pure Python, so each burner holds one core all the time.
BURNER = "while True: pass"


@dataclass
class Fleet:
    client: Client
    provider: FakeProvider
    workers: list[subprocess.Popen[bytes]]  # one `promptq worker --processes 1` each


@contextmanager
def fleet(
    directory: Path,
    provider_config: FakeProviderConfig,
    *,
    workers: int,
    concurrency: int,
    settings: Mapping[str, str] | None = None,
    extra_env: Sequence[str] = (),
    extra_config: str = "",
) -> Iterator[Fleet]:
    """A fresh redis-server, the fake provider and ``workers`` worker processes of
    ``concurrency`` calls each, warmed up (every process has loaded LiteLLM and answered).

    The workers see none of this process's LLM_*/PROMPTQ_* variables: only the fleet's own
    (model, key, endpoint, Redis, a config file holding ``extra_config``), then ``settings``,
    then ``extra_env`` (KEY=VALUE items from a benchmark's command line). Logs go to
    ``directory``, which is created.
    """
    directory.mkdir()
    with ExitStack() as stack:
        # A benchmark stopped with SIGTERM (kill, pkill) still stops its workers and
        # redis-server: the exit unwinds through this block instead of leaving them running.
        # The handler before it is back once the fleet is gone.
        before = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        stack.callback(signal.signal, signal.SIGTERM, before)
        redis_server = RedisServerProcess(shutil.which("redis-server") or "redis-server", directory)
        redis_server.start()
        stack.callback(redis_server.stop)
        provider = FakeProvider(provider_config).start()
        stack.callback(provider.stop)
        config = directory / "config.toml"
        config.write_text(
            f'[rate_limits."{WARM_UP_MODEL}"]  # no limits of ours for the warm-up\n{extra_config}'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_"))}
        env |= {
            "PROMPTQ_CONFIG": str(config),
            "PROMPTQ_REDIS_URL": redis_server.url,
            "LLM_MODEL": MODEL,
            "LLM_API_KEY": "sk-bench",
            "LLM_BASE_URL": provider.base_url,
        }
        env |= dict(settings or {})
        env |= dict(item.split("=", 1) for item in extra_env)
        processes: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_workers, processes)
        for n in range(workers):
            log = stack.enter_context((directory / f"worker-{n}.log").open("wb"))
            command = [sys.executable, "-m", "worker", "worker", "--loglevel", "WARNING"]
            command += ["--processes", "1", "--concurrency", str(concurrency)]
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
        client = stack.enter_context(Client(redis_server.url))
        _warm_up(client, processes)
        yield Fleet(client, provider, processes)


def _warm_up(client: Client, processes: list[subprocess.Popen[bytes]]) -> None:
    """Every worker has taken and finished one job (so LiteLLM is loaded everywhere)."""
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    jobs = client.submit_many(
        {"prompt": "warm up", "model": WARM_UP_MODEL} for _ in range(len(processes) * 4)
    )
    for job in client.as_completed(jobs, timeout=max(1.0, deadline - time.monotonic())):
        job.wait(timeout=1)
    for process in processes:
        if process.poll() is not None:
            raise SystemExit(f"a worker exited with {process.returncode}")


def stop_workers(started: list[subprocess.Popen[bytes]]) -> None:
    """Stop worker commands (warm shutdown, then SIGKILL after 60 s) and reap them."""
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def cpu_burners(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes spinning a pure-Python loop beside the fleet; killed and reaped at
    the end, however it comes.

        with cpu_burners(os.cpu_count() or 1):
            ...  # measured on a machine with every core busy
    """
    burners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            burners.append(subprocess.Popen([sys.executable, "-c", BURNER]))
        yield burners
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()
