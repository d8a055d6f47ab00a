"""Goodput under a provider's rate limit, for each way a provider may enforce it.

For each shape and each mode, in one run: a fresh redis-server, the bundled fake provider
limiting the model to RPM requests a minute in that shape, W `promptq worker` processes of C
calls in flight, N prompts submitted at once. Shapes (the fake provider's --enforce/--ramp):

- bucket:       a bucket refilled continuously, BURST seconds of the limit deep
- bucket:N      a bucket only N requests deep (bucket:1: no burst at all)
- window:S      at most S seconds' worth of the limit in each fixed window of S seconds
- sliding:S     at most S seconds' worth of the limit in any S seconds
- tpm           a bucket of tokens instead (RPM x the tokens of one prompt a minute, BURST
                seconds deep); prompts carry max_tokens so each costs a known amount
- ramp:X[:F]    the bucket, but the rate allowed starts at F of the limit (default 0.5) and
                grows by at most X % a minute

Modes: `declared` (LLM_RPM, or LLM_TPM for tpm, set to the provider's limit; other settings at
their defaults, as a user's would be), `learned` (nothing declared: the fleet learns the limit
from the x-ratelimit-* headers and 429s), `none` (no limiter: 429s and retries only).

Printed per shape and mode: wall time against the ideal (the time the provider needs to
allow N prompts), goodput (prompts answered against what the provider allowed while the run
lasted), the share of provider requests answered 429, jobs failed and lost, the same goodput
and 429 share after the first STEADY_S seconds (the steady state, once a learned limit has
converged), and each worker's peak RSS with its growth after warm-up. Retry waits are scaled
down (LLM_RETRY_MIN_WAIT=1, MAX_WAIT=10); they are printed with the results.

--busy N runs N processes spinning a pure-Python loop beside the workers while each run is
measured (started once the fleet is warm, stopped when the run ends): one per core (--busy
auto, os.cpu_count()) shows what the limiter does when the workers get the CPU late.

    .venv/bin/python benchmarks/ratelimit.py [--rpm 1200] [--prompts N] [--workers 4]
        [--concurrency 16] [--latency 0.2] [--burst 2] [--modes declared,learned]
        [--shapes bucket:2,bucket:1,window:1,sliding:10,tpm,ramp:50] [--busy N|auto]
"""

from __future__ import annotations

import argparse
import bisect
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _fleet import cpu_burners, fleet

from api_client import Client, JobFailed, PromptRequest
from api_client._requests import build_request
from worker.fake_provider import FakeProvider, FakeProviderConfig
from worker.fake_provider.limits import Ramp, Shape
from worker.fake_provider.replies import Payload

MAX_TOKENS = 20  # per prompt under the tpm shape
RETRY_ENV = {"LLM_RETRY_MIN_WAIT": "1", "LLM_RETRY_MAX_WAIT": "10"}
STEADY_S = 10.0  # the steady state is what follows the run's first seconds
MODES = ("none", "declared", "learned")
PROMPT = "prompt number {:05d}"
# The fake provider charges ceil(characters / 4) of the prompt plus max_tokens.
TOKENS_PER_PROMPT = -(-len(PROMPT.format(0)) // 4) + MAX_TOKENS


@dataclass(frozen=True)
class Enforcement:
    """One shape of the benchmark: the provider it makes, and what that provider allows."""

    name: str
    provider: FakeProviderConfig
    rpm: int

    @classmethod
    def parse(cls, text: str, args: argparse.Namespace) -> Enforcement:
        kind, _, rest = text.partition(":")
        base = {"burst_s": args.burst, "latency_s": args.latency}
        if kind == "tpm" and not rest:
            config = FakeProviderConfig(tpm=args.rpm * TOKENS_PER_PROMPT, **base)
        elif kind == "ramp":
            percent, _, start = rest.partition(":")
            ramp = Ramp(float(percent), float(start)) if start else Ramp(float(percent))
            config = FakeProviderConfig(rpm=args.rpm, ramp=ramp, **base)
        else:
            config = FakeProviderConfig(rpm=args.rpm, shape=Shape.parse(text), **base)
        return cls(text, config, args.rpm)

    def allowed(self, elapsed_s: float) -> float:
        """Prompts the provider lets through in the first ``elapsed_s`` of a run at most
        (its steady rate; a burst's or a window's head start aside)."""
        ramp = self.provider.ramp
        minutes = ramp.allowance_min(elapsed_s) if ramp else elapsed_s / 60
        return minutes * self.rpm

    def ideal_s(self, prompts: int) -> float:
        """How long the provider needs to allow ``prompts``."""
        ramp = self.provider.ramp
        if ramp is None:
            return prompts / self.rpm * 60
        low, high = 0.0, prompts / (self.rpm * ramp.start) * 60  # it never allows less
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if self.allowed(middle) < prompts else (low, middle)
        return high

    def settings(self, mode: str) -> dict[str, str]:
        """The workers' settings in ``mode``, beyond the fleet's own."""
        if mode == "none":
            return RETRY_ENV | {"PROMPTQ_LIMITER_ADAPTIVE": "false"}
        if mode == "learned":
            return dict(RETRY_ENV)
        if self.provider.tpm:
            return RETRY_ENV | {"LLM_TPM": str(self.provider.tpm)}
        return RETRY_ENV | {"LLM_RPM": str(self.provider.rpm)}


@dataclass
class Outcome:
    elapsed_s: float
    ideal_s: float
    goodput: float  # answers against what the provider allowed
    rate_limited: float  # share of provider requests answered 429
    provider_requests: int
    succeeded: int
    failed: int
    lost: int
    steady_goodput: float  # the same two after the first STEADY_S
    steady_rate_limited: float
    peak_rss_mb: list[float]
    rss_growth_mb: list[float]


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def submit_and_collect(
    client: Client, requests: list[PromptRequest], timeout_s: float
) -> tuple[list[float], int, float]:
    """Submit every request at once; (seconds into the run of each answer, failed, seconds
    until the last outcome)."""
    started = time.monotonic()
    jobs = client.submit_many(requests)
    answered: list[float] = []
    failed = 0
    try:
        for job in client.as_completed(jobs, timeout=timeout_s):
            try:
                job.wait(timeout=1)
                answered.append(time.monotonic() - started)
            except JobFailed:
                failed += 1
    except TimeoutError:
        pass  # the jobs left are counted as lost
    return answered, failed, time.monotonic() - started


def run(shape: Enforcement, mode: str, args: argparse.Namespace, directory: Path) -> Outcome:
    params = {"max_tokens": MAX_TOKENS} if shape.provider.tpm else {}
    requests = [build_request(PROMPT.format(n), None, None, params) for n in range(args.prompts)]
    ideal_s = shape.ideal_s(args.prompts)
    with fleet(
        directory / f"{shape.name.replace(':', '-')}-{mode}",
        shape.provider,
        workers=args.workers,
        concurrency=args.concurrency,
        settings=shape.settings(mode),
        extra_env=args.env,
    ) as f:
        warm = f.provider.stats()
        baseline = [rss_mb(p.pid, "VmRSS") for p in f.workers]
        at_steady: dict[str, int] = {}
        timer = threading.Timer(STEADY_S, lambda: at_steady.update(_counts(f.provider)))
        with cpu_burners(args.busy):
            timer.start()
            try:
                answered, failed, elapsed_s = submit_and_collect(
                    f.client, requests, timeout_s=ideal_s * 5 + 120
                )
            finally:
                timer.cancel()
        end = _counts(f.provider)
        peaks = [rss_mb(p.pid, "VmHWM") for p in f.workers]
        growth = [rss_mb(p.pid, "VmRSS") - b for p, b in zip(f.workers, baseline, strict=True)]
    start = _counts_of(warm)
    steady = at_steady or end  # a run shorter than STEADY_S has no steady state: all of it
    steady_answers = len(answered) - bisect.bisect_right(answered, STEADY_S)
    steady_allowed = shape.allowed(elapsed_s) - shape.allowed(STEADY_S)
    return Outcome(
        elapsed_s=elapsed_s,
        ideal_s=ideal_s,
        goodput=len(answered) / shape.allowed(elapsed_s),
        rate_limited=_share_429(start, end),
        provider_requests=end["requests"] - start["requests"],
        succeeded=len(answered),
        failed=failed,
        lost=args.prompts - len(answered) - failed,
        steady_goodput=steady_answers / steady_allowed if steady_allowed > 0 else float("nan"),
        steady_rate_limited=_share_429(steady, end) if at_steady else float("nan"),
        peak_rss_mb=peaks,
        rss_growth_mb=growth,
    )


def _counts(provider: FakeProvider) -> dict[str, int]:
    return _counts_of(provider.stats())


def _counts_of(stats: Payload) -> dict[str, int]:
    return {name: int(stats[name]) for name in ("requests", "rate_limited")}


def _share_429(since: dict[str, int], until: dict[str, int]) -> float:
    requests = until["requests"] - since["requests"]
    return (until["rate_limited"] - since["rate_limited"]) / max(1, requests)


def burner_count(text: str) -> int:
    """--busy's value: a count of burners, or "auto" for one per core."""
    count = (os.cpu_count() or 1) if text == "auto" else int(text)
    if count < 0:
        raise ValueError(text)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpm", type=int, default=1200)
    parser.add_argument("--prompts", type=int, default=0, help="default: a minute's worth")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--burst", type=float, default=2.0, help="the bucket shapes' seconds")
    parser.add_argument("--shapes", default="bucket:2,bucket:1,window:1,sliding:10,tpm,ramp:50")
    parser.add_argument("--modes", default="declared,learned", help=f"of {', '.join(MODES)}")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra worker setting"
    )
    parser.add_argument(
        "--busy",
        type=burner_count,
        default=0,
        metavar="N",
        help="CPU burners beside the workers while measuring (auto: one per core)",
    )
    args = parser.parse_args()
    args.prompts = args.prompts or args.rpm
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    try:
        shapes = [Enforcement.parse(text, args) for text in args.shapes.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    print(
        f"{args.prompts} prompts, limit {args.rpm}/min (bucket shapes: {args.burst:g} s deep), "
        f"latency {args.latency:g} s, {args.workers} workers x {args.concurrency} in flight, "
        f"retry waits {RETRY_ENV['LLM_RETRY_MIN_WAIT']}-{RETRY_ENV['LLM_RETRY_MAX_WAIT']} s, "
        f"{args.busy} CPU burners beside them"
    )
    steady = f"after {STEADY_S:g} s: "
    print(
        f"{'shape':<11}{'mode':<9}{'time s':>7}{'ideal s':>8}{'goodput':>8}{'429s':>7}"
        f"{'requests':>9}{'ok':>6}{'failed':>7}{'lost':>5} | {steady}"
        f"{'goodput':>7}{'429s':>7} | peak RSS MB (growth after warm-up)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            for mode in modes:
                o = run(shape, mode, args, Path(tmp))
                rss = ", ".join(
                    f"{p:.0f} ({g:+.0f})"
                    for p, g in zip(o.peak_rss_mb, o.rss_growth_mb, strict=True)
                )
                print(
                    f"{shape.name:<11}{mode:<9}{o.elapsed_s:>7.1f}{o.ideal_s:>8.1f}"
                    f"{o.goodput:>8.3f}{o.rate_limited:>7.1%}{o.provider_requests:>9}"
                    f"{o.succeeded:>6}{o.failed:>7}{o.lost:>5} | {'':>{len(steady)}}"
                    f"{o.steady_goodput:>7.3f}{o.steady_rate_limited:>7.1%} | {rss}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
