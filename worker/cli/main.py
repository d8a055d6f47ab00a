"""The promptq command line; each command imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from worker.cli.batch_command import add_batch
from worker.cli.cancel_command import add_cancel
from worker.cli.small_commands import add_config, add_fake_provider, add_status, add_submit
from worker.cli.worker_command import add_worker, run_worker
from worker.errors import EXIT_USAGE, ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if extra and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "worker":
            return run_worker(args, extra)
        command: int = args.run(args)
        return command
    except ConfigError as exc:
        print(f"promptq {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptq",
        description="Run LLM calls in the background: a Celery worker fleet behind a Redis queue.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_worker(commands)
    add_batch(commands)
    add_submit(commands)
    add_cancel(commands)
    add_status(commands)
    add_config(commands)
    add_fake_provider(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
