"""Reading a worker's Prometheus metrics in tests: its URL from its log, and a scrape."""

from __future__ import annotations

import re
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.worker_process import WorkerProcess

# A sample by its name and its labels.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(worker: WorkerProcess) -> str:
    """Where the worker serves its metrics, from the line it logs at start."""
    found = re.search(r"metrics at (http://\S+/metrics)", worker.log())
    assert found, f"no metrics URL in the worker's log:\n{worker.log()}"
    return found.group(1)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the worker has not counted it yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def summed(workers: list[WorkerProcess], name: str, **labels: str) -> float:
    """A sample summed over workers, as Prometheus would."""
    return sum(sample(scrape(metrics_url(w)), name, **labels) for w in workers)


def wait_for_total(
    workers: list[WorkerProcess], name: str, expected: float, timeout_s: float = 10.0, **labels: str
) -> None:
    """Wait for a summed sample to reach ``expected``: a worker counts a job's end just after
    storing its outcome, so a client can see the outcome first."""
    deadline = time.monotonic() + timeout_s
    while (found := summed(workers, name, **labels)) != expected:
        assert time.monotonic() < deadline, f"{name}{labels} is {found}, not {expected}"
        time.sleep(0.05)
