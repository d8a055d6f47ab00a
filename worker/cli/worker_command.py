"""`promptq worker`: its options, and one process or a supervisor of several."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence

from api_client._constants import QUEUE
from worker.cli.options import POOLS, config_option
from worker.config_file import ignored_notice
from worker.errors import EXIT_USAGE
from worker.settings import Settings, load_settings


def add_worker(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = commands.add_parser(
        "worker",
        help="run a worker that takes prompts from the queue and calls the model",
        description=(
            "Run a worker. Settings come from LLM_*/PROMPTQ_* environment variables and the "
            "[llm]/[promptq] tables of config.toml. Arguments not listed here are passed to "
            "`celery worker` unchanged."
        ),
    )
    config_option(worker)
    worker.add_argument(
        "-c",
        "--concurrency",
        type=int,
        help="calls in flight in this process (default: PROMPTQ_CONCURRENCY, 64)",
    )
    worker.add_argument(
        "-P",
        "--pool",
        choices=POOLS,
        default="threads",
        help="Celery pool; threads keeps many slow calls in flight cheaply (default: threads)",
    )
    worker.add_argument("-l", "--loglevel", default="INFO", help="log level (default: INFO)")
    worker.add_argument(
        "--processes",
        type=int,
        help="worker processes, each with --concurrency calls in flight, under one supervisor "
        "(default: PROMPTQ_PROCESSES, else one per core; 1 runs the worker in this process)",
    )
    # Set by the supervisor on each worker process it starts (1..N).
    worker.add_argument("--process-index", type=int, help=argparse.SUPPRESS)


def run_worker(args: argparse.Namespace, celery_args: Sequence[str]) -> int:
    """Start a Celery worker on the promptq queue, or a supervisor of several; a bad setting
    stops it here, named."""
    settings = load_settings(args.config)
    notice = ignored_notice(settings.ignored)
    if notice and args.process_index is None:  # once, not once per supervised process
        print(f"promptq worker: {notice}", file=sys.stderr)
    if args.concurrency is not None and args.concurrency < 1:
        print("promptq worker: --concurrency must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.processes is not None and args.processes < 1:
        print("promptq worker: --processes must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    queue = settings.queue
    if args.pool == "prefork" and queue.metrics_port is not None:
        # The calls would be counted in the pool's child processes, out of the server's sight.
        print("promptq worker: PROMPTQ_METRICS_PORT needs -P threads or solo", file=sys.stderr)
        return EXIT_USAGE
    from worker.cli.supervisor import default_processes  # noqa: PLC0415

    processes = args.processes or queue.processes or default_processes()
    if args.process_index is None and processes > 1:
        if queue.metrics_port and queue.metrics_port + processes - 1 > 65535:
            print(
                f"promptq worker: PROMPTQ_METRICS_PORT {queue.metrics_port} leaves no room for "
                f"{processes} processes (each serves on the next port)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        from worker.cli.supervisor import Supervisor  # noqa: PLC0415

        return Supervisor(lambda index: _child_command(args, celery_args, index), processes).run()
    hostname = f"promptq-{os.getpid()}@%h"
    if args.process_index is not None:
        hostname = f"promptq-{os.getppid()}-{args.process_index}@%h"
        settings = _for_process(settings, args.process_index)
    from worker.app.celery_app import create_app, with_concurrency  # noqa: PLC0415  (loads Celery and LiteLLM: only this command needs them)

    settings = with_concurrency(settings, args.concurrency)
    app = create_app(settings)
    # LiteLLM's import leaves ~190 MB of objects that live as long as the process: moved out
    # of the garbage collector's sight, each full collection takes ~30 ms instead of ~250 ms
    # (a pause of every thread), measured at 0.2-0.35 ms of CPU saved per prompt.
    gc.freeze()
    concurrency = settings.queue.concurrency
    app.worker_main(
        [
            "worker",
            f"--pool={args.pool}",
            f"--concurrency={concurrency}",
            f"--queues={QUEUE}",
            f"--loglevel={args.loglevel}",
            f"--hostname={hostname}",
            # Gossip and mingle cost start-up time and traffic and promptq needs neither.
            "--without-gossip",
            "--without-mingle",
            *celery_args,
        ]
    )
    return app.exit_status


def _child_command(args: argparse.Namespace, celery_args: Sequence[str], index: int) -> list[str]:
    """The command line of the supervisor's worker process ``index``: this one's, for one."""
    command = [sys.executable, "-m", "worker", "worker", "--processes", "1"]
    command += ["--process-index", str(index), "--pool", args.pool, "--loglevel", args.loglevel]
    if args.config is not None:
        command += ["--config", args.config]
    if args.concurrency is not None:
        command += ["--concurrency", str(args.concurrency)]
    return [*command, *celery_args]


def _for_process(settings: Settings, index: int) -> Settings:
    """A supervised worker process's settings: process ``index`` (1..N) serves its metrics on
    PROMPTQ_METRICS_PORT + index - 1 (0 stays 0: any free port), and logs as worker-INDEX."""
    import multiprocessing  # noqa: PLC0415

    # Celery's log lines name the process (%(processName)s): the supervised ones apart.
    multiprocessing.current_process().name = f"worker-{index}"
    port = settings.queue.metrics_port
    if not port:
        return settings
    queue = settings.queue.model_copy(update={"metrics_port": port + index - 1})
    return settings.model_copy(update={"queue": queue})
