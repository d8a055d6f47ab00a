"""Goodput under a provider's rate limit: plain retries against the fleet-wide limiter.

For each mode, in one run: a fresh redis-server, the bundled fake provider limited to RPM
requests a minute (of which BURST seconds' worth may be spent at once), W `promptq worker`
processes, N prompts submitted at once. Modes:

- none:       no limiter (PROMPTQ_LIMITER_ADAPTIVE=false, no LLM_RPM): 429s and retries only
- configured: LLM_RPM set to the provider's limit
- adaptive:   nothing configured; the fleet learns the limit from x-ratelimit-* headers
- tpm:        a tokens-per-minute limit instead (provider --tpm, LLM_TPM), prompts with
              max_tokens so each call costs a known amount

Printed per mode: completion time against the ideal N/RPM minutes, goodput as a fraction of
the limit (prompts, or tokens for tpm, per minute while the run lasted), the fraction of
provider requests answered 429, jobs failed and lost, and each worker's peak RSS with its
growth after warm-up. Retry waits are scaled down (LLM_RETRY_MIN_WAIT=1, MAX_WAIT=10) so the
`none` mode ends in reasonable time; they are printed with the results.

    .venv/bin/python benchmarks/ratelimit.py [--rpm 1200] [--prompts N] [--workers 4]
        [--concurrency 16] [--latency 0.2] [--burst 2] [--modes none,configured,adaptive,tpm]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _fleet import fleet

from api_client import Client, JobFailed, PromptRequest
from api_client._requests import build_request
from worker.fake_provider import FakeProviderConfig

MAX_TOKENS = 20  # per prompt in the tpm mode
RETRY_ENV = {"LLM_RETRY_MIN_WAIT": "1", "LLM_RETRY_MAX_WAIT": "10"}


@dataclass
class Outcome:
    mode: str
    elapsed_s: float
    ideal_s: float
    goodput: float  # fraction of the limit
    rate_limited: float  # fraction of provider requests answered 429
    provider_requests: int
    succeeded: int
    failed: int
    lost: int
    peak_rss_mb: list[float]
    rss_growth_mb: list[float]


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def submit_and_collect(
    client: Client, requests: list[PromptRequest], timeout_s: float
) -> tuple[int, int, float]:
    """Submit every request at once; (succeeded, failed, seconds until the last outcome)."""
    started = time.monotonic()
    jobs = client.submit_many(requests)
    succeeded = failed = 0
    try:
        for job in client.as_completed(jobs, timeout=timeout_s):
            try:
                job.wait(timeout=1)
                succeeded += 1
            except JobFailed:
                failed += 1
    except TimeoutError:
        pass  # the jobs left are counted as lost
    return succeeded, failed, time.monotonic() - started


def run_mode(mode: str, args: argparse.Namespace, directory: Path) -> Outcome:
    tokens_mode = mode == "tpm"
    per_prompt_tokens = 0
    if tokens_mode:
        # The fake provider charges ceil(characters / 4) of the prompt plus max_tokens.
        per_prompt_tokens = -(-len("prompt number 00000") // 4) + MAX_TOKENS
        provider_config = FakeProviderConfig(
            tpm=args.rpm * per_prompt_tokens, burst_s=args.burst, latency_s=args.latency
        )
    else:
        provider_config = FakeProviderConfig(
            rpm=args.rpm, burst_s=args.burst, latency_s=args.latency
        )
    settings = RETRY_ENV | {
        "PROMPTQ_LIMITER_ADAPTIVE": "true" if mode == "adaptive" else "false",
    }
    if mode == "configured":
        settings["LLM_RPM"] = str(args.rpm)
    if tokens_mode:
        settings["LLM_TPM"] = str(provider_config.tpm)
    with fleet(
        directory / mode,
        provider_config,
        workers=args.workers,
        concurrency=args.concurrency,
        settings=settings,
        extra_env=args.env,
    ) as f:
        warm = f.provider.stats()
        baseline = [rss_mb(p.pid, "VmRSS") for p in f.workers]
        params = {"max_tokens": MAX_TOKENS} if tokens_mode else {}
        requests = [
            build_request(f"prompt number {n:05d}", None, None, params) for n in range(args.prompts)
        ]
        ideal_s = args.prompts / args.rpm * 60
        succeeded, failed, elapsed_s = submit_and_collect(
            f.client, requests, timeout_s=ideal_s * 5 + 120
        )
        stats = f.provider.stats()
        peaks = [rss_mb(p.pid, "VmHWM") for p in f.workers]
        growth = [rss_mb(p.pid, "VmRSS") - b for p, b in zip(f.workers, baseline, strict=True)]
    requests_made = stats["requests"] - warm["requests"]
    rate_limited = stats["rate_limited"] - warm["rate_limited"]
    return Outcome(
        mode=mode,
        elapsed_s=elapsed_s,
        ideal_s=ideal_s,
        goodput=succeeded / elapsed_s * 60 / args.rpm,
        rate_limited=rate_limited / max(1, requests_made),
        provider_requests=requests_made,
        succeeded=succeeded,
        failed=failed,
        lost=args.prompts - succeeded - failed,
        peak_rss_mb=peaks,
        rss_growth_mb=growth,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpm", type=int, default=1200)
    parser.add_argument("--prompts", type=int, default=0, help="default: a minute's worth")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--burst", type=float, default=2.0)
    parser.add_argument("--modes", default="none,configured,adaptive,tpm")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra worker setting"
    )
    args = parser.parse_args()
    args.prompts = args.prompts or args.rpm
    print(
        f"{args.prompts} prompts, limit {args.rpm}/min (burst {args.burst:g} s), latency "
        f"{args.latency:g} s, {args.workers} workers x {args.concurrency} threads, "
        f"retry waits {RETRY_ENV['LLM_RETRY_MIN_WAIT']}-{RETRY_ENV['LLM_RETRY_MAX_WAIT']} s"
    )
    header = (
        f"{'mode':<11}{'time s':>8}{'ideal s':>8}{'goodput':>9}{'429s':>8}{'requests':>9}"
        f"{'ok':>6}{'failed':>7}{'lost':>5}  peak RSS MB (growth after warm-up)"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            o = run_mode(mode, args, Path(tmp))
            rss = ", ".join(
                f"{p:.0f} ({g:+.0f})" for p, g in zip(o.peak_rss_mb, o.rss_growth_mb, strict=True)
            )
            print(
                f"{o.mode:<11}{o.elapsed_s:>8.1f}{o.ideal_s:>8.1f}{o.goodput:>9.3f}"
                f"{o.rate_limited:>8.1%}{o.provider_requests:>9}{o.succeeded:>6}{o.failed:>7}"
                f"{o.lost:>5}  {rss}",
                flush=True,
            )


if __name__ == "__main__":
    main()
