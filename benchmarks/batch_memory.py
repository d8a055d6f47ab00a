"""Peak memory of `promptq batch` as its input grows: the input is streamed, so it stays flat.

Runs the real command (embedded mode) against the bundled fake provider for each input size
and prints peak RSS (VmHWM) and throughput; the ratio of the largest to the smallest peak is
the figure to watch (about 1.0 means flat). Linux only (reads /proc).

    .venv/bin/python benchmarks/batch_memory.py 10000 100000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker.fake_provider import FakeProvider, FakeProviderConfig


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(lines: int, base_url: str, directory: Path) -> tuple[float, float, dict[str, object]]:
    source = directory / f"in-{lines}.jsonl"
    with source.open("w") as file:
        for i in range(lines):
            file.write(json.dumps({"custom_id": f"c{i}", "prompt": f"prompt number {i}"}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_"))}
    env |= {"LLM_MODEL": "openai/bench", "LLM_API_KEY": "bench", "LLM_BASE_URL": base_url}
    command = [sys.executable, "-m", "worker", "batch", str(source), "-o"]
    command += [str(directory / f"out-{lines}.jsonl"), "-q", "--json", "--max-in-flight", "500"]
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        try:
            peak = max(peak, peak_rss_mb(process.pid))
        except FileNotFoundError:
            break
        time.sleep(0.2)
    stdout, _ = process.communicate()
    elapsed = time.monotonic() - started
    summary: dict[str, object] = json.loads(stdout)
    return peak, lines / elapsed, summary


def main() -> None:
    sizes = [int(arg) for arg in sys.argv[1:]] or [2000, 20000]
    with FakeProvider(FakeProviderConfig()) as provider, tempfile.TemporaryDirectory() as tmp:
        peaks = []
        print(f"{'lines':>8} {'peak RSS MB':>12} {'prompts/s':>10}  succeeded")
        for size in sizes:
            peak, rate, summary = run(size, provider.base_url, Path(tmp))
            peaks.append(peak)
            print(f"{size:>8} {peak:>12.1f} {rate:>10.1f}  {summary['succeeded']}")
        print(f"peak RSS ratio, largest / smallest input: {peaks[-1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
