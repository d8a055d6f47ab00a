"""Throughput and CPU per prompt: promptq workers against direct litellm.acompletion.

Everything in one run, on a fresh redis-server and the bundled fake provider (`promptq
fake-provider`, its own process) at LATENCY seconds a reply and no rate limit:

- submit: the time to queue N prompts with `Client.submit_many` against a loop of Celery's
  `send_task` (an app configured as the worker's), each from N prompt strings (both build
  and validate the same request); no worker is running meanwhile.
- direct: `litellm.acompletion` with C calls in flight, in one fresh process (as the worker
  calls it: max_retries=0, num_retries=0, a timeout, the key and base URL); and direct xP,
  P such processes at once with N/P prompts each: how far P processes can scale on this
  machine at all (its cores are shared with redis-server, the provider and anything else).
- promptq x1: `promptq worker --processes 1 -c C`, N prompts submitted at once.
- promptq xP: `promptq worker --processes P -c C` (default: one process per core).

The model is openai/gpt-4o-mini (the fake provider answers for any name), so LiteLLM prices
every answer as in most deployments.

For each: prompts/s from the first submit to the last outcome, CPU ms per prompt (the
measured processes' user + system time over the run, divided by N: the direct process; the
worker processes, supervisor included), each worker's peak RSS and its growth after a
warm-up of 2 x C prompts per process; and the CPU redis-server and the fake provider used
meanwhile, per prompt (they share the machine's cores with the workers). Then the ratios
against the issue's targets, PASS or MISS. Absolute figures vary by about 20 % between runs
on a shared machine, and by as much between two minutes of one run: the layouts are measured
in ROUNDS (3), each round measuring every layout once, the two sides of each ratio one after
the other (direct, x1, xP, direct xP); each round's ratios are shown and their median is
judged.

    .venv/bin/python benchmarks/throughput.py [--prompts 3000] [--concurrency 64]
        [--processes P] [--latency 0.2] [--rounds 3] [--skip direct,directP,x1,xP,submit]
        [--separate] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from _fleet import stop_workers

from api_client import Client
from api_client._constants import KEY_PREFIX, TASK_NAME
from api_client._requests import build_request
from worker.app.embedded import RedisServerProcess

# A model LiteLLM prices, as most deployments call: cost_usd is computed for every answer.
MODEL = "openai/gpt-4o-mini"
API_KEY = "sk-bench"
CALLS_KEY = f"{KEY_PREFIX}spend:total"  # every settled call adds 1 to its "calls" field
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TARGETS = {  # (what, threshold): the targets, as ratios within one run
    "x1_vs_direct": 0.8,
    "xP_vs_x1": 1.7,
    "submit_many_vs_send_task": 2.5,
    "rss_growth_mb": 50.0,
}


@dataclass
class Run:
    name: str
    prompts: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    ok: int = 0
    failed: int = 0
    others_cpu_s: float = 0.0  # redis-server and the fake provider, over the same run
    peak_rss_mb: list[float] = field(default_factory=list)
    rss_growth_mb: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def cpu_ms_per_prompt(self) -> float:
        return self.cpu_s * 1000 / max(1, self.prompts)

    @property
    def others_ms_per_prompt(self) -> float:
        return self.others_cpu_s * 1000 / max(1, self.prompts)


# --- processes, from /proc ---------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from the third (state) on


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(found)


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the fake provider ---------------------------------------------------------------------


class ProviderProcess:
    """`promptq fake-provider` in its own process, on a free port."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.base_url = ""
        self._process: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> ProviderProcess:
        command = [sys.executable, "-m", "worker", "fake-provider", "--port", "0"]
        command += ["--latency", str(self.latency_s)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        found = re.search(r"(http://\S+/v1)", line)
        if not found:
            raise SystemExit(f"fake provider did not start: {line!r}")
        self.base_url = found.group(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)


# --- direct litellm --------------------------------------------------------------------------


def direct_child(base_url: str, prompts: int, concurrency: int) -> None:
    """Runs in a fresh process: N acompletion calls, C in flight; prints JSON figures."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm  # noqa: PLC0415  (only this child pays for it)

    litellm.suppress_debug_info = True

    async def call(n: int, gate: asyncio.Semaphore) -> bool:
        async with gate:
            response = await litellm.acompletion(
                model=MODEL,
                messages=[{"role": "user", "content": f"prompt number {n:05d}"}],
                api_key=API_KEY,
                base_url=base_url,
                timeout=60,
                drop_params=True,
                max_retries=0,
                num_retries=0,
            )
            return bool(response.choices)

    async def run(count: int) -> int:
        gate = asyncio.Semaphore(concurrency)
        results = await asyncio.gather(*(call(n, gate) for n in range(count)))
        return sum(results)

    async def main() -> dict[str, float]:
        await run(concurrency * 2)  # warm-up: connections, LiteLLM's lazy imports
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
        baseline_rss = rss_mb(os.getpid())
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        ok = await run(prompts)
        elapsed = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {
            "elapsed_s": elapsed,
            "cpu_s": used,
            "ok": ok,
            "peak_rss_mb": rss_mb(os.getpid(), "VmHWM"),
            "rss_growth_mb": rss_mb(os.getpid()) - baseline_rss,
        }

    print(json.dumps(asyncio.run(main())), flush=True)


def run_direct(
    args: argparse.Namespace, base_url: str, others: Callable[[], float], processes: int = 1
) -> Run:
    """N prompts through direct acompletion in ``processes`` processes at once (N/P each)."""
    share = args.prompts // processes
    command = [sys.executable, __file__, "--direct-child", base_url]
    command += ["--prompts", str(share), "--concurrency", str(args.concurrency)]
    children = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    for child in children:  # each has warmed up
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("a direct acompletion process failed; run it alone to see why")
    before = others()
    for child in children:  # and all start together
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    figures = []
    for child in children:
        out, _ = child.communicate(timeout=900)
        figures.append(json.loads(out.strip().splitlines()[-1]))
    ok = sum(f["ok"] for f in figures)
    return Run(
        name="direct acompletion" + (f" x{processes}" if processes > 1 else ""),
        prompts=share * processes,
        elapsed_s=max(f["elapsed_s"] for f in figures),
        cpu_s=sum(f["cpu_s"] for f in figures),
        others_cpu_s=others() - before,
        ok=ok,
        failed=share * processes - ok,
        peak_rss_mb=[f["peak_rss_mb"] for f in figures],
        rss_growth_mb=[f["rss_growth_mb"] for f in figures],
    )


# --- promptq workers -------------------------------------------------------------------------


def worker_env(redis_url: str, base_url: str, extra: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_"))}
    env |= {
        "PROMPTQ_REDIS_URL": redis_url,
        "LLM_MODEL": MODEL,
        "LLM_API_KEY": API_KEY,
        "LLM_BASE_URL": base_url,
        "LLM_TIMEOUT": "60",
    }
    env |= dict(item.split("=", 1) for item in extra)
    return env


def settled_calls(client: redis.Redis) -> int:
    return int(client.hget(CALLS_KEY, "calls") or 0)


def wait_calls(client: redis.Redis, count: int, timeout_s: float, watch: list[int]) -> float:
    """Wait until ``count`` calls have settled; the monotonic time they had (or the deadline)."""
    deadline = time.monotonic() + timeout_s
    while settled_calls(client) < count:
        now = time.monotonic()
        if now > deadline:
            return now
        for pid in watch:
            if not Path(f"/proc/{pid}").exists():
                raise SystemExit(f"worker process {pid} exited")
        time.sleep(0.02)
    return time.monotonic()


def start_workers(
    args: argparse.Namespace, processes: int, env: dict[str, str], log: Path
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """(the processes started, the worker processes doing the calls)."""
    base = [sys.executable, "-m", "worker", "worker", "--loglevel", "WARNING"]
    base += ["--concurrency", str(args.concurrency)]
    started = []
    with log.open("ab") as out:
        if args.separate:  # one `promptq worker` per process, as a fleet is started by hand
            for _ in range(processes):
                started.append(
                    subprocess.Popen(
                        base,
                        env=env | {"PROMPTQ_PROCESSES": "1"},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            return started, [p.pid for p in started]
        command = [*base, "--processes", str(processes)]
        parent = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if processes == 1:
        return [parent], [parent.pid]
    deadline = time.monotonic() + 60
    while len(children := children_of(parent.pid)) < processes:
        if time.monotonic() > deadline or parent.poll() is not None:
            raise SystemExit(f"the supervisor did not start {processes} workers; see {log}")
        time.sleep(0.05)
    return [parent], children


def run_promptq(
    args: argparse.Namespace,
    processes: int,
    redis_url: str,
    base_url: str,
    logs: Path,
    *,
    others: Callable[[], float],
) -> Run:
    name = f"promptq x{processes}" + (" (separate)" if args.separate else "")
    store = redis.Redis.from_url(redis_url)
    store.flushall()
    env = worker_env(redis_url, base_url, args.env)
    started, workers = start_workers(args, processes, env, logs / f"workers-{processes}.log")
    measured = [p.pid for p in started if p.pid not in workers] + workers
    try:
        with Client(redis_url) as client:
            warm_up = processes * args.concurrency * 2
            client.submit_many([f"warm up {n}" for n in range(warm_up)])
            wait_calls(store, warm_up, 180, workers)
            if settled_calls(store) < warm_up:
                raise SystemExit(f"{name}: the warm-up did not finish")
            baseline_rss = [rss_mb(pid) for pid in workers]
            cpu_before = sum(cpu_s(pid) for pid in measured)
            others_before = others()
            prompts = [f"prompt number {n:05d}" for n in range(args.prompts)]
            started_at = time.monotonic()
            jobs = client.submit_many(prompts)
            ended_at = wait_calls(store, warm_up + args.prompts, args.prompts / 5 + 120, workers)
            cpu_used = sum(cpu_s(pid) for pid in measured) - cpu_before
            others_used = others() - others_before
            peaks = [rss_mb(pid, "VmHWM") for pid in workers]
            growth = [rss_mb(pid) - b for pid, b in zip(workers, baseline_rss, strict=True)]
            finished = [job for job in client.poll(jobs) if job.last_status is not None]
            ok = sum(1 for job in finished if job.last_status == "succeeded")
            failed = sum(1 for job in finished if job.last_status == "failed")
    finally:
        stop_workers(started)
        store.close()
    return Run(
        name=name,
        prompts=args.prompts,
        elapsed_s=ended_at - started_at,
        cpu_s=cpu_used,
        others_cpu_s=others_used,
        ok=ok,
        failed=failed,
        peak_rss_mb=peaks,
        rss_growth_mb=growth,
    )


# --- submit rates ----------------------------------------------------------------------------


def run_submit(args: argparse.Namespace, redis_url: str) -> tuple[float, float]:
    """(submit_many prompts/s, send_task loop prompts/s), the better of two tries each."""
    from celery import Celery  # noqa: PLC0415

    from worker.app.celery_app import celery_config  # noqa: PLC0415
    from worker.settings import load_settings  # noqa: PLC0415

    store = redis.Redis.from_url(redis_url)
    store.flushall()
    settings = load_settings(None, queue={"redis_url": redis_url})
    app = Celery("promptq-bench", set_as_current=False)
    app.conf.update(celery_config(settings))
    prompts = [f"prompt number {n:05d}" for n in range(args.prompts)]

    def celery_loop() -> None:
        for prompt in prompts:
            request = build_request(prompt, None, None, {}).model_dump(mode="json")
            app.send_task(
                TASK_NAME,
                args=(request,),
                task_id=str(uuid.uuid4()),
                ignore_result=True,
                argsrepr="(<request>,)",
                kwargsrepr="{}",
            )

    many: list[float] = []
    loop: list[float] = []
    with Client(redis_url) as client:
        client.submit_many(prompts[:10])  # connect both first
        prompts_backup, prompts[:] = prompts[:], prompts[:10]
        celery_loop()
        prompts[:] = prompts_backup
        store.flushall()
        for _ in range(2):
            started = time.monotonic()
            client.submit_many(prompts)
            many.append(len(prompts) / (time.monotonic() - started))
            store.flushall()
            started = time.monotonic()
            celery_loop()
            loop.append(len(prompts) / (time.monotonic() - started))
            store.flushall()
    app.close()
    store.close()
    return max(many), max(loop)


# --- rounds ----------------------------------------------------------------------------------


def run_round(
    args: argparse.Namespace,
    redis_url: str,
    provider: ProviderProcess,
    logs: Path,
    *,
    skip: set[str],
    others: Callable[[], float],
) -> dict[str, Run]:
    """Every layout once, each ratio's two layouts one after the other."""
    runs: dict[str, Run] = {}
    if "direct" not in skip:
        runs["direct"] = run_direct(args, provider.base_url, others)
        print(f"direct measured: {runs['direct'].rate:.1f} prompts/s", flush=True)
    for key, processes in (("x1", 1), ("xP", args.processes)):
        if key not in skip:
            runs[key] = run_promptq(
                args, processes, redis_url, provider.base_url, logs, others=others
            )
            print(f"{runs[key].name} measured: {runs[key].rate:.1f} prompts/s", flush=True)
    if "directP" not in skip and args.processes > 1:
        runs["directP"] = run_direct(args, provider.base_url, others, args.processes)
        print(f"direct xP measured: {runs['directP'].rate:.1f} prompts/s", flush=True)
    return runs


# --- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(rounds: list[dict[str, Run]], submit: tuple[float, float] | None) -> None:
    print(
        f"\n{'layout':<32}{'prompts/s':>10}{'CPU ms/prompt':>15}{'redis+provider':>16}"
        f"{'ok':>7}{'failed':>7}  peak RSS MB per process (growth after warm-up)"
    )
    for number, runs in enumerate(rounds, 1):
        for run in runs.values():
            rss = ", ".join(
                f"{p:.0f} ({g:+.0f})"
                for p, g in zip(run.peak_rss_mb, run.rss_growth_mb, strict=True)
            )
            name = f"{run.name} (round {number})" if len(rounds) > 1 else run.name
            print(
                f"{name:<32}{run.rate:>10.1f}{run.cpu_ms_per_prompt:>15.2f}"
                f"{run.others_ms_per_prompt:>16.2f}{run.ok:>7}"
                f"{run.failed:>7}  {rss}"
            )
    if submit is not None:
        many, loop = submit
        print(
            f"\nsubmit: Client.submit_many {many:,.0f} prompts/s; Celery send_task loop {loop:,.0f}"
        )
    print(
        "\ntargets (ratios within this run"
        + ("; each round's, then their median, which is judged" if len(rounds) > 1 else "")
        + "):"
    )
    ceiling = ratios(rounds, "directP", "direct")
    if ceiling:
        print(
            f"  {'(this machine: direct xP / x1':<34}{show(ceiling)}  "
            "what P processes of plain LiteLLM gain here: the ceiling for promptq xP / x1)"
        )
    target("promptq x1 / direct acompletion", ratios(rounds, "x1", "direct"), "x1_vs_direct")
    target("promptq xP / promptq x1", ratios(rounds, "xP", "x1"), "xP_vs_x1")
    if submit is not None:
        target("submit_many / send_task loop", [submit[0] / submit[1]], "submit_many_vs_send_task")
    growths = [
        g for runs in rounds for key in ("x1", "xP") if key in runs for g in runs[key].rss_growth_mb
    ]
    if growths:
        worst = max(growths)
        goal = TARGETS["rss_growth_mb"]
        print(
            f"  {'worker RSS growth after warm-up':<34}{worst:+5.0f} MB (<= +{goal:.0f}, "
            f"the most of any worker)  {verdict(worst <= goal)}"
        )


def ratios(rounds: list[dict[str, Run]], top: str, bottom: str) -> list[float]:
    """Each round's ratio of two layouts' rates (the rounds that measured both)."""
    return [r[top].rate / r[bottom].rate for r in rounds if top in r and bottom in r]


def show(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:5.2f}"
    each = ", ".join(f"{v:.2f}" for v in values)
    return f"{each} -> median {statistics.median(values):.2f}"


def target(what: str, values: list[float], name: str) -> None:
    if not values:
        return
    goal = TARGETS[name]
    ok = statistics.median(values) >= goal
    print(f"  {what:<34}{show(values)}  (>= {goal})  {verdict(ok)}")


def default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", type=int, default=default_processes())
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every layout this many times, interleaved (ratios: each round's median)",
    )
    parser.add_argument("--skip", default="", help="comma-separated: direct,directP,x1,xP,submit")
    parser.add_argument(
        "--separate",
        action="store_true",
        help="start P separate `promptq worker` processes instead of one with --processes P",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra worker setting"
    )
    parser.add_argument("--direct-child", metavar="BASE_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_child:
        direct_child(args.direct_child, args.prompts, args.concurrency)
        return
    skip = set(filter(None, args.skip.split(",")))
    print(
        f"{args.prompts} prompts, provider latency {args.latency:g} s, concurrency "
        f"{args.concurrency} per process, {args.processes} processes for xP "
        f"({default_processes()} cores)",
        flush=True,
    )
    rounds: list[dict[str, Run]] = []
    submit = None
    with tempfile.TemporaryDirectory() as tmp, ProviderProcess(args.latency) as provider:
        logs = Path(tmp)
        redis_server = RedisServerProcess(shutil.which("redis-server") or "redis-server", logs)
        redis_server.start()
        info = redis.Redis.from_url(redis_server.url)

        def others() -> float:
            """CPU seconds redis-server and the fake provider have used so far."""
            cpu = info.info("cpu")
            return cpu_s(provider.pid) + float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

        try:
            if "submit" not in skip:
                submit = run_submit(args, redis_server.url)
                print(
                    f"submit measured: {submit[0]:,.0f} vs {submit[1]:,.0f} prompts/s", flush=True
                )
            for number in range(1, args.rounds + 1):
                rounds.append(
                    run_round(args, redis_server.url, provider, logs, skip=skip, others=others)
                )
                print(f"round {number} of {args.rounds} measured", flush=True)
        finally:
            info.close()
            redis_server.stop()
    report(rounds, submit)


if __name__ == "__main__":
    main()
