"""What reliable fetch costs: benchmarks/throughput.py's `promptq x1` on this tree against a
baseline commit (before issue 13's atomic take, heartbeats and request copies), in one run.

The baseline is checked out in a temporary git worktree; each round runs throughput.py's x1
layout (N prompts, one worker process, the bundled fake provider at 0.2 s) once in each tree,
the order alternating between rounds, and prints both rates and their ratio. The median ratio
is judged against the issue's target: reliable fetch may cost at most 5 % (ratio >= 0.95).
Rates on this shared machine move by about 20 % between minutes: read the per-round ratios,
not the absolute figures.

    .venv/bin/python benchmarks/fetch_cost.py [--baseline 1ed4ee2] [--rounds 3]
        [--prompts 3000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "1ed4ee2"  # main before issue 13
TARGET = 0.95
RATE = re.compile(r"promptq x1 measured: ([0-9.]+) prompts/s")


def x1_rate(tree: Path, args: argparse.Namespace) -> float:
    """promptq x1's prompts/s, by throughput.py run from ``tree`` (its own code throughout)."""
    command = [
        sys.executable,
        "benchmarks/throughput.py",
        "--skip",
        "direct,directP,xP,submit",
        "--rounds",
        "1",
        "--prompts",
        str(args.prompts),
        "--concurrency",
        str(args.concurrency),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        command, cwd=tree, env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    found = RATE.search(done.stdout)
    if found is None:
        raise SystemExit(f"no x1 rate from {tree}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git ref to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="promptq-baseline-") as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(baseline), args.baseline],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            ratios = []
            for number in range(1, args.rounds + 1):
                order = [("baseline", baseline), ("current", ROOT)]
                if number % 2 == 0:
                    order.reverse()
                rates = {name: x1_rate(tree, args) for name, tree in order}
                ratios.append(rates["current"] / rates["baseline"])
                print(
                    f"round {number}: baseline {rates['baseline']:.1f} prompts/s, current "
                    f"{rates['current']:.1f} prompts/s, current/baseline {ratios[-1]:.3f}",
                    flush=True,
                )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False
            )
    median = statistics.median(ratios)
    verdict = "PASS" if median >= TARGET else "MISS"
    print(
        f"x1 current/baseline: median {median:.3f} of {len(ratios)} rounds (>= {TARGET}) {verdict}"
    )
    return 0 if median >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
