"""Throughput of the fake provider: N chat requests at concurrency C against latency L.

The ideal is C / L requests per second (every connection always waiting on one reply); the
printed ratio says how close one event loop gets. By default the server is a FakeProvider
thread in this process, sharing the interpreter with the client, so the figure is a lower
bound; `--server process` runs `python -m worker.fake_provider` apart and also prints the
server's own CPU time per request.

    .venv/bin/python benchmarks/fake_provider.py [--requests 2000] [--concurrency 200]
                                                 [--latency 0.2] [--server thread|process]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp

from worker.fake_provider import FakeProvider, FakeProviderConfig


async def fire(url: str, requests: int, concurrency: int) -> float:
    """Send ``requests`` chat requests over ``concurrency`` connections; return the seconds."""
    body = {"model": "bench", "messages": [{"role": "user", "content": "hello benchmark"}]}
    remaining = iter(range(requests))
    failures: list[int] = []

    async def connection(session: aiohttp.ClientSession) -> None:
        for _ in remaining:
            async with session.post(url, json=body) as response:
                await response.read()
                if response.status != 200:
                    failures.append(response.status)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(connection(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {sorted(set(failures))}")
    return elapsed


def run_in_process(args: argparse.Namespace) -> tuple[float, int]:
    with FakeProvider(FakeProviderConfig(latency_s=args.latency)) as provider:
        elapsed = asyncio.run(
            fire(f"{provider.base_url}/chat/completions", args.requests, args.concurrency)
        )
        served: int = provider.stats()["ok"]
    return elapsed, served


def run_as_subprocess(args: argparse.Namespace) -> tuple[float, int]:
    command = [sys.executable, "-m", "worker.fake_provider", "--port", "0"]
    with subprocess.Popen(
        [*command, "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True
    ) as server:
        assert server.stdout is not None
        match = re.search(r"(http://\S+/v1)", server.stdout.readline())
        assert match, "the server printed no URL"
        elapsed = asyncio.run(
            fire(f"{match.group(1)}/chat/completions", args.requests, args.concurrency)
        )
        with urllib.request.urlopen(match.group(1).removesuffix("/v1") + "/stats") as response:
            served: int = json.load(response)["ok"]
        server.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(server.pid, 0)
        server.returncode = os.waitstatus_to_exitcode(status)
    cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000
    print(
        f"server process: {cpu_ms:.0f} ms CPU in all (start-up included), "
        f"{cpu_ms / args.requests:.3f} ms per request"
    )
    return elapsed, served


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--server", choices=("thread", "process"), default="thread")
    args = parser.parse_args()

    run = run_in_process if args.server == "thread" else run_as_subprocess
    elapsed, served = run(args)
    rate = args.requests / elapsed
    print(
        f"{args.requests} requests, concurrency {args.concurrency}, latency {args.latency:g}s, "
        f"server in a {args.server}: {elapsed:.2f} s, {rate:.0f} requests/s"
    )
    if args.latency > 0:
        ideal = args.concurrency / args.latency
        print(f"ideal {ideal:.0f} requests/s; ratio {rate / ideal:.2f}")
    assert served == args.requests, f"server answered {served} of {args.requests}"


if __name__ == "__main__":
    main()
