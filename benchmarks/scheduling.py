"""Scheduling: an agent's prompts behind a batch, tenants sharing a limit, cancelling a backlog.

Each scenario runs against a fresh redis-server, the bundled fake provider with a rate limit
that the workers are told of (LLM_RPM), and W `promptq worker` processes:

- priority: B batch prompts queued at `batch` priority, then A agent prompts at
  `interactive` priority spread over the batch's run. Printed: the agent's p50/p95 time from
  submit to answer beside the provider's own latency, and the goodput (answers per minute as
  a fraction of the limit) over the batch's run. Targets: p95 <= latency + 1 s, goodput >=
  0.95, nothing lost.
- fairness: two tenants of weights 2 and 1 each queue T prompts at once. Printed: the share
  of requests and of tokens each received while both had jobs waiting (target 2:1 within
  10 %), and how soon after one finished the other ran at the whole limit (target <= 2 s).
- cancel: C prompts queued under a spending budget, the fleet busy with them for 3 s, then
  all cancelled in one call. Printed: how long the cancel took, the provider requests
  received after it returned (target 0), the money still reserved (target 0) and the jobs
  not ended (target 0).

    .venv/bin/python benchmarks/scheduling.py [--scenarios priority,fairness] [--workers 2]
        [--rpm 600] [--latency 0.5] [--batch 600] [--agents 20] [--tenant-prompts 300]
        [--cancel 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import _fleet
import redis
from _fleet import Fleet

from api_client import PromptResult
from api_client._constants import budget_key
from worker.fake_provider import FakeProviderConfig


def fleet(
    directory: Path, args: argparse.Namespace, rpm: int, extra_config: str = ""
) -> AbstractContextManager[Fleet]:
    """The benchmarks' fleet (benchmarks/_fleet.py), the provider limited to ``rpm`` and the
    workers told so."""
    return _fleet.fleet(
        directory,
        FakeProviderConfig(rpm=rpm, burst_s=args.burst, latency_s=args.latency),
        workers=args.workers,
        concurrency=args.concurrency,
        settings={"LLM_RPM": str(rpm)},
        extra_env=args.env,
        extra_config=extra_config,
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run_priority(directory: Path, args: argparse.Namespace) -> None:
    rate_s = args.rpm / 60
    with fleet(directory / "priority", args, args.rpm) as f:
        client = f.client
        started = time.monotonic()
        batch = client.submit_many(
            {"prompt": f"batch prompt {n:05d}", "priority": "batch"} for n in range(args.batch)
        )
        ideal_s = (args.batch + args.agents) / rate_s
        spacing_s = ideal_s * 0.8 / args.agents
        latencies: list[float] = []
        lock = threading.Lock()

        def agent(n: int) -> None:
            submitted = time.monotonic()
            job = client.submit(f"agent prompt {n}", priority="interactive")
            job.wait(timeout=ideal_s * 3)
            with lock:
                latencies.append(time.monotonic() - submitted)

        threads = []
        for n in range(args.agents):
            time.sleep(max(0.0, started + 3 + n * spacing_s - time.monotonic()))
            thread = threading.Thread(target=agent, args=(n,))
            thread.start()
            threads.append(thread)
        done = lost = 0
        try:
            for job in client.as_completed(batch, timeout=ideal_s * 3 + 60):
                job.wait(timeout=1)
                done += 1
        except TimeoutError:
            lost = args.batch - done
        elapsed_s = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=60)
    goodput = (done + len(latencies)) / elapsed_s / rate_s
    print(
        f"priority: {args.batch} batch prompts, {args.agents} agent prompts (interactive), "
        f"limit {args.rpm}/min, provider latency {args.latency:g} s, {args.workers} workers"
    )
    print(
        f"  agent time to answer: p50 {statistics.median(latencies):.2f} s, p95 "
        f"{percentile(latencies, 0.95):.2f} s, max {max(latencies):.2f} s (provider latency "
        f"{args.latency:g} s; target p95 <= {args.latency + 1:g} s)"
    )
    print(
        f"  batch: {elapsed_s:.1f} s (ideal {ideal_s:.1f} s), goodput {goodput:.3f} of the "
        f"limit (target >= 0.95), lost {lost + args.agents - len(latencies)}",
        flush=True,
    )


def run_fairness(directory: Path, args: argparse.Namespace) -> None:
    rate_s = args.rpm / 60
    weights = {"team-a": 2, "team-b": 1}
    tenants_toml = "[tenants]\n" + "".join(f'"{t}" = {w}\n' for t, w in weights.items())
    with fleet(directory / "fairness", args, args.rpm, tenants_toml) as f:
        client = f.client
        jobs = {
            tenant: client.submit_many(
                {"prompt": f"{tenant} prompt {n:05d}", "tenant": tenant}
                for n in range(args.tenant_prompts)
            )
            for tenant in weights
        }
        finished: dict[str, list[tuple[float, int]]] = {t: [] for t in weights}
        for tenant, tenant_jobs in jobs.items():
            for job in tenant_jobs:
                result = job.wait(timeout=args.tenant_prompts * 2 / rate_s + 120)
                assert isinstance(result, PromptResult)
                finished[tenant].append((result.created.timestamp(), result.usage.total_tokens))
    first_done = min(max(t for t, _ in done) for done in finished.values())
    start = min(t for done in finished.values() for t, _ in done)
    contested = {
        t: [(at, tok) for at, tok in done if at <= first_done] for t, done in finished.items()
    }
    requests = {t: len(v) for t, v in contested.items()}
    tokens = {t: sum(tok for _, tok in v) for t, v in contested.items()}
    ratio_requests = requests["team-a"] / max(1, requests["team-b"])
    ratio_tokens = tokens["team-a"] / max(1, tokens["team-b"])
    other = next(t for t, done in finished.items() if max(at for at, _ in done) > first_done)
    after = sorted(at for at, _ in finished[other] if at > first_done)
    window = [at for at in after if at <= first_done + 2.0]
    # How soon the other tenant ran at 90 % of the limit: the first 1 s window reaching it.
    full_after_s = None
    for index, at in enumerate(after):
        in_second = sum(1 for other_at in after[index:] if other_at < at + 1.0)
        if in_second >= 0.9 * rate_s:
            full_after_s = at - first_done
            break
    print(
        f"fairness: tenants {weights} each queue {args.tenant_prompts} prompts, limit "
        f"{args.rpm}/min, {args.workers} workers"
    )
    print(
        f"  contested {first_done - start:.1f} s: requests {requests} (ratio "
        f"{ratio_requests:.2f}, target 2 +- 10 %), tokens {tokens} (ratio {ratio_tokens:.2f})"
    )
    print(
        f"  after the first finished: {other} ran {len(window)} calls in the next 2 s "
        f"(limit {2 * rate_s:.0f}); at 90 % of the limit after "
        f"{'never' if full_after_s is None else f'{full_after_s:.2f} s'} (target <= 2 s)",
        flush=True,
    )


def run_cancel(directory: Path, args: argparse.Namespace) -> None:
    prices = "[llm]\ninput_cost_per_token = 1e-6\noutput_cost_per_token = 1e-6\n"
    with fleet(directory / "cancel", args, args.rpm, prices) as f:
        client, provider = f.client, f.provider
        budget = client.create_budget(1000.0)
        jobs = client.submit_many(
            {"prompt": f"to cancel {n:05d}", "budget": budget} for n in range(args.cancel)
        )
        time.sleep(3)  # the fleet is busy with them: calls in flight, slots reserved
        started = time.monotonic()
        result = client.cancel([job.id for job in jobs])
        cancel_s = time.monotonic() - started
        requests_at_return = provider.stats()["requests"]
        in_flight = len(result.running)
        time.sleep(max(3.0, 2 * args.latency + 1))  # what was in flight ends; nothing starts
        requests_after = provider.stats()["requests"] - requests_at_return
        with redis.Redis.from_url(client.settings.redis_url) as broker:
            reserved = float(broker.hget(budget_key(budget), "reserved") or 0)  # type: ignore[arg-type]
            spent_calls = int(broker.hget(budget_key(budget), "calls") or 0)  # type: ignore[arg-type]
        still_open = sum(not job.status().done for job in jobs)
    print(
        f"cancel: {args.cancel} queued against a limit of {args.rpm}/min, cancelled after 3 s "
        f"({args.workers} workers)"
    )
    print(
        f"  cancel returned in {cancel_s * 1000:.0f} ms: {len(result.cancelled)} cancelled, "
        f"{in_flight} running, {len(result.finished)} finished; provider requests received "
        f"after it returned: {requests_after} (target 0: those in flight were received before); "
        f"spend reserved after: ${reserved:.6f} (target 0; {spent_calls} calls booked); jobs "
        f"not ended: {still_open} (target 0)",
        flush=True,
    )


SCENARIOS = {"priority": run_priority, "fairness": run_fairness, "cancel": run_cancel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="priority,fairness,cancel")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--burst", type=float, default=1.0)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=600)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--tenant-prompts", type=int, default=300)
    parser.add_argument("--cancel", type=int, default=10_000, help="jobs queued, then cancelled")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra worker setting"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios.split(","):
            SCENARIOS[name](Path(tmp), args)


if __name__ == "__main__":
    main()
