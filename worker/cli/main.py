"""The promptq command line; each command imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from api_client._constants import QUEUE
from worker.errors import EXIT_USAGE, ConfigError
from worker.settings import Settings, load_settings

POOLS = ("threads", "prefork", "solo")
EXIT_FAILED = 1  # some prompts failed
EXIT_INTERRUPTED = 130


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
    _add_worker(commands)
    _add_batch(commands)
    _add_submit(commands)
    _add_status(commands)
    _add_config(commands)
    _add_fake_provider(commands)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="config file (default: $PROMPTQ_CONFIG, else ./config.toml if present)"
    )


def _add_worker(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = commands.add_parser(
        "worker",
        help="run a worker that takes prompts from the queue and calls the model",
        description=(
            "Run a worker. Settings come from LLM_*/PROMPTQ_* environment variables and the "
            "[llm]/[promptq] tables of config.toml. Arguments not listed here are passed to "
            "`celery worker` unchanged."
        ),
    )
    _config_option(worker)
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


def _add_batch(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    batch = commands.add_parser(
        "batch",
        help="run a JSONL file of prompts and write the answers to a JSONL file",
        description=(
            "Run every prompt of INPUT (OpenAI Batch API request lines, or simple "
            '{"prompt": ...} / {"messages": [...]} lines) and write the answers to OUTPUT in the '
            "OpenAI Batch API output format, as they arrive. Running the same command again "
            "resumes: only custom_ids not yet in OUTPUT are sent. With PROMPTQ_REDIS_URL (or "
            "[promptq] redis_url) set, the prompts go to that fleet's workers; without, the "
            "command runs an embedded broker and worker itself."
        ),
    )
    batch.add_argument("input", type=Path, metavar="INPUT.jsonl")
    batch.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT.jsonl")
    _config_option(batch)
    batch.add_argument("--model", help="use this model for every line (overrides the file's)")
    batch.add_argument(
        "--max-in-flight",
        type=int,
        default=500,
        help="prompts queued or running at once (default: 500)",
    )
    batch.add_argument(
        "--max-spend",
        type=float,
        metavar="USD",
        help="stop calling once this run has spent USD (by LiteLLM's prices); the lines left "
        "fail as budget_exceeded",
    )
    batch.add_argument(
        "--retry-failed", action="store_true", help="also re-run lines that failed in OUTPUT"
    )
    batch.add_argument(
        "--skip-invalid", action="store_true", help="run the valid lines despite invalid ones"
    )
    batch.add_argument(
        "-s",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an LLM setting for this run's embedded worker, e.g. -s num_retries=3 (repeatable)",
    )
    batch.add_argument(
        "-c", "--concurrency", type=int, help="embedded worker threads (default: 64)"
    )
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    batch.add_argument(
        "--json", action="store_true", help="print a JSON summary on stdout at the end"
    )
    batch.set_defaults(run=run_batch_command)


def run_batch_command(args: argparse.Namespace) -> int:
    from worker.batch.files import check_input  # noqa: PLC0415
    from worker.batch.run import RichDisplay, run_batch  # noqa: PLC0415

    name = "promptq batch"
    if args.max_in_flight < 1:
        print(f"{name}: --max-in-flight must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.max_spend is not None and not (0 <= args.max_spend < math.inf):
        print(f"{name}: --max-spend must be a finite amount >= 0", file=sys.stderr)
        return EXIT_USAGE
    if not args.input.is_file():
        print(f"{name}: no such input file: {args.input}", file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(args.config, llm=_parse_overrides(args.set))
    valid, problems = check_input(args.input, model=args.model)
    if problems:
        for problem in problems:
            print(f"{name}: {args.input}: {problem}", file=sys.stderr)
        if not args.skip_invalid:
            print(f"{name}: nothing was submitted (--skip-invalid runs the rest)", file=sys.stderr)
            return EXIT_USAGE
    talk = not args.quiet
    show_progress = talk and not args.json and sys.stderr.isatty()
    try:
        with _broker(settings, args, talk) as redis_url:
            from api_client import Client  # noqa: PLC0415

            with Client(redis_url) as client:
                budget = None
                if args.max_spend is not None:
                    budget = client.create_budget(args.max_spend)
                display = RichDisplay() if show_progress else None
                with display or nullcontext():
                    tally = run_batch(
                        client,
                        args.input,
                        args.output,
                        valid_items=valid,
                        model=args.model,
                        max_in_flight=args.max_in_flight,
                        retry_failed=args.retry_failed,
                        budget=budget,
                        display=display,
                    )
    except KeyboardInterrupt:
        print(
            f"{name}: interrupted; {args.output} holds every answer so far: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    summary = tally.summary()
    if args.json:
        print(json.dumps(summary))
    if talk:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(tally.failed_by_kind.items()))
        print(
            f"{name}: {tally.succeeded} succeeded, {tally.failed} failed"
            + (f" ({kinds})" if kinds else "")
            + f", {tally.already_done} already in {args.output}; "
            f"{tally.prompt_tokens + tally.completion_tokens:,} tokens, "
            f"${tally.cost_usd:.4f}, {summary['elapsed_s']:.1f} s",
            file=sys.stderr,
        )
    return EXIT_FAILED if tally.failed else 0


def _parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-s/--set takes KEY=VALUE, got {pair!r}")
        overrides[key.strip().lower().removeprefix("llm_")] = value
    return overrides


def _add_submit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = commands.add_parser(
        "submit",
        help="submit one prompt; print its job id, or wait and print the answer",
        description="Submit one prompt to the fleet at PROMPTQ_REDIS_URL (default localhost).",
    )
    submit.add_argument("prompt", help="the prompt text")
    _config_option(submit)
    submit.add_argument("--model", help="model for this prompt (default: the workers' LLM_MODEL)")
    submit.add_argument("--wait", action="store_true", help="wait for the answer and print it")
    submit.add_argument(
        "--timeout", type=float, default=600.0, help="seconds --wait waits (default: 600)"
    )
    submit.set_defaults(run=run_submit_command)


def run_submit_command(args: argparse.Namespace) -> int:
    from api_client import Client, JobFailed, PromptqError  # noqa: PLC0415

    settings = load_settings(args.config)
    try:
        with Client(settings.queue.broker_url) as client:
            job = client.submit(args.prompt, model=args.model)
            if not args.wait:
                print(job.id)
                return 0
            print(job.wait(timeout=args.timeout).content or "")
            return 0
    except JobFailed as exc:
        print(f"promptq submit: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PromptqError as exc:
        print(f"promptq submit: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _add_status(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        help="queue depth, jobs in flight, retries scheduled, workers online",
        description="What the fleet at PROMPTQ_REDIS_URL (default localhost) is doing now.",
    )
    _config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(run=run_status_command)


def run_status_command(args: argparse.Namespace) -> int:
    from api_client import PromptqError  # noqa: PLC0415
    from worker.ops.fleet_status import format_status, gather_status  # noqa: PLC0415

    try:
        status = gather_status(load_settings(args.config).queue.broker_url)
    except PromptqError as exc:
        print(f"promptq status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(status.to_json()) if args.json else format_status(status))
    return 0


def _add_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = commands.add_parser(
        "config",
        help="the effective settings and where each value came from (secrets masked)",
        description=(
            "Print every LLM_* and PROMPTQ_* setting as a worker would use it, and its source: "
            "default, file, environment or flag. API keys are masked."
        ),
    )
    _config_option(config)
    config.add_argument(
        "-s", "--set", action="append", default=[], metavar="KEY=VALUE", help="as for batch"
    )
    config.set_defaults(run=run_config_command)


def run_config_command(args: argparse.Namespace) -> int:
    from worker.ops.config_report import describe_settings, format_rows  # noqa: PLC0415

    rows = describe_settings(args.config, llm_overrides=_parse_overrides(args.set))
    print(format_rows(rows))
    return 0


def _add_fake_provider(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from worker import fake_provider  # noqa: PLC0415  (aiohttp: only this command needs it)

    server = commands.add_parser(
        "fake-provider",
        help="run a local OpenAI-compatible server for demos, tests and capacity planning",
        description=(
            "A local OpenAI-compatible server (/v1/chat/completions, /v1/embeddings, "
            "/v1/models) with deterministic replies, optional latency, errors and "
            "RPM/TPM limits that answer 429 with Retry-After, as a real provider would."
        ),
    )
    fake_provider.add_arguments(server)
    server.set_defaults(run=fake_provider.run)


@contextmanager
def _broker(settings: Settings, args: argparse.Namespace, talk: bool) -> Iterator[str]:
    """The fleet's Redis when one is configured, else an embedded broker and worker."""
    url = settings.queue.redis_url
    if url is not None:
        if args.set and talk:
            print(
                "promptq batch: -s/--set only applies to an embedded worker; "
                "the fleet's workers use their own settings",
                file=sys.stderr,
            )
        yield url
        return
    from worker.app.embedded import Embedded  # noqa: PLC0415  (Celery and LiteLLM: embedded only)

    embedded = Embedded(settings, concurrency=args.concurrency)
    with embedded as embedded_url:
        if talk:
            print(
                f"promptq batch: no broker configured, running embedded ({embedded.description} "
                "and a worker in this process); set PROMPTQ_REDIS_URL to use a fleet instead",
                file=sys.stderr,
            )
        yield embedded_url


if __name__ == "__main__":
    sys.exit(main())
