"""The promptq command line; each command imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from api_client._constants import QUEUE

from .settings import ConfigError, load_settings

POOLS = ("threads", "prefork", "solo")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "worker":
        return run_worker(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptq",
        description="Run LLM calls in the background: a Celery worker fleet behind a Redis queue.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    worker = commands.add_parser(
        "worker",
        help="run a worker that takes prompts from the queue and calls the model",
        description=(
            "Run a worker. Settings come from LLM_*/PROMPTQ_* environment variables and the "
            "[llm]/[promptq] tables of config.toml. Arguments not listed here are passed to "
            "`celery worker` unchanged."
        ),
    )
    worker.add_argument(
        "--config", help="config file (default: $PROMPTQ_CONFIG, else ./config.toml if present)"
    )
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
    return parser


def run_worker(args: argparse.Namespace, celery_args: Sequence[str]) -> int:
    """Start a Celery worker on the promptq queue; a bad setting stops it here, named."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"promptq worker: {exc}", file=sys.stderr)
        return 2
    if args.concurrency is not None and args.concurrency < 1:
        print("promptq worker: --concurrency must be at least 1", file=sys.stderr)
        return 2
    from .app import create_app  # noqa: PLC0415  (loads Celery and LiteLLM: only this command needs them)

    app = create_app(settings)
    concurrency = args.concurrency or settings.queue.concurrency
    app.worker_main(
        [
            "worker",
            f"--pool={args.pool}",
            f"--concurrency={concurrency}",
            f"--queues={QUEUE}",
            f"--loglevel={args.loglevel}",
            f"--hostname=promptq-{os.getpid()}@%h",
            # Gossip and mingle cost start-up time and traffic and promptq needs neither.
            "--without-gossip",
            "--without-mingle",
            *celery_args,
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
