"""The worker's Prometheus metrics: what each event counts, and the server that exposes them."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_client._schemas import ErrorKind, Usage
from worker.errors import ConfigError, MetricsPortTaken
from worker.ops.metrics import MAX_MODELS, OTHER_MODEL, Metrics, MetricsServer
from worker.settings import load_settings

MODEL = "openai/gpt-4o-mini"


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_a_success_counts_the_call_the_job_its_tokens_and_its_cost() -> None:
    metrics = Metrics()

    metrics.call_succeeded(MODEL, Usage(prompt_tokens=12, completion_tokens=30), 0.0042)
    metrics.call_succeeded(MODEL, Usage(prompt_tokens=8, completion_tokens=5), None)

    assert value(metrics, "promptq_calls_total", model=MODEL, outcome="ok") == 2
    assert value(metrics, "promptq_jobs_succeeded_total", model=MODEL) == 2
    assert value(metrics, "promptq_prompt_tokens_total", model=MODEL) == 20
    assert value(metrics, "promptq_completion_tokens_total", model=MODEL) == 35
    assert value(metrics, "promptq_spend_usd_total", model=MODEL) == pytest.approx(0.0042)


def test_failures_count_by_kind_and_429s_on_their_own() -> None:
    metrics = Metrics()

    metrics.call_failed(MODEL, ErrorKind.RATE_LIMITED)
    metrics.call_failed(MODEL, ErrorKind.RATE_LIMITED)
    metrics.call_failed(MODEL, ErrorKind.TIMEOUT)
    metrics.retry_scheduled(MODEL, ErrorKind.RATE_LIMITED)
    metrics.job_failed(ErrorKind.BAD_REQUEST)
    metrics.budget_refused(MODEL)

    assert value(metrics, "promptq_calls_total", model=MODEL, outcome="rate_limited") == 2
    assert value(metrics, "promptq_calls_total", model=MODEL, outcome="timeout") == 1
    assert value(metrics, "promptq_rate_limited_total", model=MODEL) == 2
    assert value(metrics, "promptq_retries_total", model=MODEL, kind="rate_limited") == 1
    assert value(metrics, "promptq_jobs_failed_total", kind="bad_request") == 1
    assert value(metrics, "promptq_budget_refusals_total", model=MODEL) == 1


def test_limiter_waits_count_slept_and_parked_apart_with_their_time() -> None:
    metrics = Metrics()

    metrics.limiter_waited(MODEL, "slept", 0.5)
    metrics.limiter_waited(MODEL, "slept", 1.0)
    metrics.limiter_waited(MODEL, "parked", 30.0)

    assert value(metrics, "promptq_limiter_waits_total", model=MODEL, how="slept") == 2
    assert value(metrics, "promptq_limiter_wait_seconds_total", model=MODEL, how="slept") == 1.5
    assert value(metrics, "promptq_limiter_waits_total", model=MODEL, how="parked") == 1
    assert value(metrics, "promptq_limiter_wait_seconds_total", model=MODEL, how="parked") == 30


def test_timing_observes_a_call_that_raises_too() -> None:
    metrics = Metrics()

    with metrics.timing(MODEL):
        pass
    with pytest.raises(RuntimeError), metrics.timing(MODEL):
        raise RuntimeError("provider down")

    assert value(metrics, "promptq_call_duration_seconds_count", model=MODEL) == 2
    assert value(metrics, "promptq_call_duration_seconds_bucket", model=MODEL, le="0.1") == 2
    assert value(metrics, "promptq_call_duration_seconds_bucket", model=MODEL, le="300.0") == 2


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()

    first.job_failed(ErrorKind.TIMEOUT)

    assert value(first, "promptq_jobs_failed_total", kind="timeout") == 1
    assert value(second, "promptq_jobs_failed_total", kind="timeout") == 0


def test_model_names_past_the_cap_share_one_label() -> None:
    metrics = Metrics()

    for n in range(MAX_MODELS + 5):
        metrics.job_failed(ErrorKind.TIMEOUT)
        metrics.call_failed(f"openai/model-{n}", ErrorKind.NOT_FOUND)

    labels = {
        sample.labels["model"]
        for family in metrics.registry.collect()
        if family.name == "promptq_calls"
        for sample in family.samples
    }
    assert len(labels) == MAX_MODELS + 1
    assert value(metrics, "promptq_calls_total", model=OTHER_MODEL, outcome="not_found") == 5


def test_every_metric_has_the_prefix_and_a_help_text() -> None:
    metrics = Metrics()
    metrics.call_succeeded(MODEL, Usage(prompt_tokens=1, completion_tokens=1), 0.1)

    ours = [f for f in metrics.registry.collect() if f.name.startswith("promptq_")]

    assert len(ours) == 16
    for family in ours:
        assert family.documentation, family.name


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        f"{sample.name}{sorted(sample.labels.items())}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_server_serves_the_registry_on_a_free_port_and_stops() -> None:
    metrics = Metrics()
    metrics.job_failed(ErrorKind.AUTHENTICATION)
    server = MetricsServer(metrics.registry, "127.0.0.1", 0)

    url = server.start()
    try:
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/metrics")
        samples = scrape(url)
        assert samples["promptq_jobs_failed_total[('kind', 'authentication')]"] == 1
        assert "process_resident_memory_bytes[]" in samples
    finally:
        server.stop()

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as sock:  # released: nothing listens there any more
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the scrape's TIME_WAIT
        sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_refused_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(Metrics().registry, "127.0.0.1", port)

        with pytest.raises(MetricsPortTaken, match="PROMPTQ_METRICS_PORT") as caught:
            server.start()

    assert f"127.0.0.1:{port}" in str(caught.value)


def test_metrics_are_off_unless_a_port_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().queue.metrics_port is None
    assert load_settings().queue.metrics_host == "127.0.0.1"

    monkeypatch.setenv("PROMPTQ_METRICS_PORT", "9100")
    monkeypatch.setenv("PROMPTQ_METRICS_HOST", "0.0.0.0")

    queue = load_settings().queue
    assert (queue.metrics_host, queue.metrics_port) == ("0.0.0.0", 9100)


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_a_metrics_port_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    monkeypatch.setenv("PROMPTQ_METRICS_PORT", port)

    with pytest.raises(ConfigError, match="PROMPTQ_METRICS_PORT"):
        load_settings()
