"""The fake-provider command line: its options, the "listening on" line, serving until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence

from .config import FakeProviderConfig, url_host
from .limits import Ramp, Shape


def _number(
    kind: type[int] | type[float], low: float, high: float = math.inf
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            bound = f"between {low:g} and {high:g}" if high < math.inf else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}: {text}")
        return value

    return parse


def _shape(text: str) -> Shape:
    try:
        return Shape.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fake-provider options (for `promptq fake-provider` and :func:`main`)."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    add("--port", type=_number(int, 0, 65535), default=8000, help="0: a free port (default: 8000)")
    add(
        "--rpm",
        type=_number(int, 0),
        default=0,
        help="requests per minute per model (default 0: no limit)",
    )
    add(
        "--tpm",
        type=_number(int, 0),
        default=0,
        help="tokens per minute per model (default 0: no limit)",
    )
    add(
        "--burst",
        type=_number(float, 0.001, 60),
        default=60.0,
        metavar="SECONDS",
        help="seconds of the rpm/tpm budget usable at once (default 60: the whole minute)",
    )
    add(
        "--enforce",
        type=_shape,
        default=Shape(),
        metavar="SHAPE",
        help="how rpm/tpm are enforced: bucket (default: --burst seconds deep), bucket:N (N "
        "requests deep), window:S (fixed S-second windows), sliding:S (any S seconds)",
    )
    add(
        "--ramp",
        type=_number(float, 0),
        default=0.0,
        metavar="PERCENT",
        help="the allowed rate grows by at most this much a minute, from --ramp-start of the "
        "limit (default 0: no ramp)",
    )
    add(
        "--ramp-start",
        type=_number(float, 0.001, 1),
        default=0.5,
        metavar="FRACTION",
        help="where a ramp starts, as a fraction of the limit (default: 0.5)",
    )
    add(
        "--latency",
        type=_number(float, 0),
        default=0.0,
        metavar="SECONDS",
        help="wait before each reply (default: 0)",
    )
    add(
        "--jitter",
        type=_number(float, 0),
        default=0.0,
        metavar="SECONDS",
        help="uniform ± jitter on the latency (default: 0)",
    )
    add(
        "--error-rate",
        type=_number(float, 0, 1),
        default=0.0,
        metavar="P",
        help="fraction of requests answered 500/502/503 (default: 0)",
    )
    add("--seed", type=int, default=0, help="seed of the error and jitter sequences (default: 0)")
    add(
        "--dimensions",
        type=_number(int, 1, 65536),
        default=8,
        help="embedding size when a request names none (default: 8)",
    )
    add(
        "--batch-delay",
        type=_number(float, 0),
        default=1.0,
        metavar="SECONDS",
        help="how long a /v1/batches batch takes to complete (default: 1)",
    )
    add(
        "--batch-failure-rate",
        type=_number(float, 0, 1),
        default=0.0,
        metavar="P",
        help="fraction of a batch's lines that fail with a 500 (default: 0)",
    )
    add(
        "--batch-expired-share",
        type=_number(float, 0, 1),
        default=0.0,
        metavar="P",
        help="fraction of a batch's lines left undone: the batch expires (default: 0)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, after printing one "listening on" line; 0 when stopped."""
    try:
        config = FakeProviderConfig(
            rpm=args.rpm,
            tpm=args.tpm,
            burst_s=args.burst,
            shape=args.enforce,
            ramp=Ramp(args.ramp, args.ramp_start) if args.ramp else None,
            latency_s=args.latency,
            jitter_s=args.jitter,
            error_rate=args.error_rate,
            seed=args.seed,
            dimensions=args.dimensions,
            batch_delay_s=args.batch_delay,
            batch_failure_rate=args.batch_failure_rate,
            batch_expired_share=args.batch_expired_share,
            host=args.host,
            port=args.port,
        )
    except ValueError as exc:  # options that only clash together
        print(f"fake-provider: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve_until_signalled(config))
    except OSError as exc:
        print(
            f"fake-provider: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr
        )
        return 1
    return 0


async def _serve_until_signalled(config: FakeProviderConfig) -> None:
    from .server import Server  # noqa: PLC0415  (aiohttp loads when serving, not for --help)

    server = Server(config, time.monotonic)
    port = await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Windows loops have no signal handlers, and only the main thread may install them.
        with contextlib.suppress(NotImplementedError, ValueError, RuntimeError):
            loop.add_signal_handler(signum, stopping.set)
    latency = f"{config.latency_s:g}s" + (f"±{config.jitter_s:g}s" if config.jitter_s else "")
    shape = f", enforce={config.shape}" if config.shape != Shape() else ""
    if config.ramp is not None:
        shape += f", ramp={config.ramp.percent_per_minute:g}%/min from {config.ramp.start:g}"
    print(
        f"fake-provider listening on {url_host(config.host)}:{port}/v1 "
        f"(rpm={config.rpm or 'unlimited'}, tpm={config.tpm or 'unlimited'}{shape}, "
        f"latency={latency})",
        flush=True,
    )
    try:
        await stopping.wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: parse ``argv`` with :func:`add_arguments`, then :func:`run`."""
    parser = argparse.ArgumentParser(
        prog="fake-provider", description="A local OpenAI-compatible server for demos and tests."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
