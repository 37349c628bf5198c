"""/metrics adds up what every worker process of a predictor counted, as Prometheus reads it."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

from prometheus_client import generate_latest

from services.predictor.metrics import (
    FAILURE,
    REFUSED,
    STALE_FLUSHES,
    SUCCESS,
    Latency,
    ServingMetrics,
    WorkerTotals,
)
from services.predictor.models import ModelCache
from services.predictor.records import PredictionRecorder
from shared.db.session import make_engine, make_session_factory
from tests.support.metrics import Samples, parse_samples, sample


def recorder() -> PredictionRecorder:
    return PredictionRecorder(make_session_factory(make_engine("sqlite://")), flush_s=1.0)  # never started here


def metrics_in(folder: Path | None, worker: str = "host:1") -> ServingMetrics:
    return ServingMetrics(folder, worker, 1.0, ModelCache(budget_mb=64), recorder())


def scrape(metrics: ServingMetrics) -> Samples:
    return parse_samples(generate_latest(metrics.registry()).decode())


def test_one_worker_counts_requests_rows_and_latency_by_org_and_version() -> None:
    metrics = metrics_in(None)
    metrics.count("acme", "v1", SUCCESS, 3, 0.0004)
    metrics.count("acme", "v1", SUCCESS, 1000, 0.003)
    metrics.count("acme", "v1", REFUSED, 0, 0.0001)
    metrics.count("", "", FAILURE, 0, 0.0001)

    samples = parse_samples(generate_latest(metrics.registry()).decode())

    assert sample(samples, "kiln_inference_requests_total", org="acme", version="v1", outcome="success") == 2
    assert sample(samples, "kiln_inference_requests_total", org="acme", version="v1", outcome="refused") == 1
    assert sample(samples, "kiln_inference_requests_total", org="", version="", outcome="failure") == 1
    assert sample(samples, "kiln_inference_rows_total", org="acme", version="v1") == 1003
    assert sample(samples, "kiln_inference_request_duration_seconds_bucket", org="acme", le="0.0005") == 1
    assert sample(samples, "kiln_inference_request_duration_seconds_bucket", org="acme", le="0.005") == 2
    assert sample(samples, "kiln_inference_request_duration_seconds_count", org="acme") == 2
    assert abs(sample(samples, "kiln_inference_request_duration_seconds_sum", org="acme") - 0.0034) < 1e-9


def test_every_worker_file_in_the_folder_is_added_up_the_answering_workers_to_the_moment(tmp_path: Path) -> None:
    metrics = metrics_in(tmp_path)
    metrics.count("acme", "v1", SUCCESS, 2, 0.001)
    metrics.flush()
    metrics.count("acme", "v1", SUCCESS, 2, 0.001)  # not flushed yet: /metrics writes it before it reads
    other = WorkerTotals(worker="host:2", requests={("acme", "v1", SUCCESS): [5, 50]})
    other.latency["acme"] = Latency(buckets=[0, 0, 0, 5, *[0] * 11], sum_s=0.004)
    (tmp_path / "host_2.json").write_bytes(other.to_json())
    (tmp_path / "half-written.json").write_bytes(b'{"worker": ')

    samples = parse_samples(generate_latest(metrics.registry()).decode())

    assert sample(samples, "kiln_inference_requests_total", org="acme", version="v1", outcome="success") == 7
    assert sample(samples, "kiln_inference_rows_total", org="acme", version="v1") == 54
    assert sample(samples, "kiln_inference_request_duration_seconds_count", org="acme") == 7
    assert sample(samples, "kiln_models_loaded", worker="host:1") == 0
    assert ("kiln_models_loaded", frozenset({("worker", "host:2")})) in samples


def test_a_counter_never_goes_back_whichever_worker_answers_the_next_scrape(tmp_path: Path) -> None:
    """Prometheus takes a counter that goes back for a restarted process, and counts it all again."""
    first, second = metrics_in(tmp_path, "host:1"), metrics_in(tmp_path, "host:2")
    labels = {"org": "acme", "version": "v1", "outcome": "success"}
    first.count("acme", "v1", SUCCESS, 1, 0.001)
    first.count("acme", "v1", SUCCESS, 1, 0.001)  # neither flushed by the first worker's timer yet

    seen = [sample(scrape(worker), "kiln_inference_requests_total", **labels) for worker in (first, second, first)]

    assert seen == [2, 2, 2]


def test_a_worker_that_could_not_write_its_totals_once_writes_them_at_the_next_flush(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"

    async def count_through_a_failed_flush() -> bytes:
        metrics = ServingMetrics(folder, "host:1", 0.05, ModelCache(budget_mb=64), recorder())
        metrics.start()
        shutil.rmtree(folder)
        folder.write_text("not a folder")  # every write into it fails
        metrics.count("acme", "v1", SUCCESS, 1, 0.001)
        await asyncio.sleep(0.2)
        folder.unlink()
        folder.mkdir()
        await asyncio.sleep(0.2)
        written = (folder / "host_1.json").read_bytes()  # by the timer, before stop() writes a last time
        await metrics.stop()
        return written

    written = WorkerTotals.from_json(asyncio.run(count_through_a_failed_flush()))

    assert written.requests == {("acme", "v1", SUCCESS): [1, 1]}


def test_a_scrape_while_this_worker_cannot_write_its_file_adds_its_live_totals_to_the_others_files(
    tmp_path: Path,
) -> None:
    metrics = metrics_in(tmp_path, "host:1")
    metrics.count("acme", "v1", SUCCESS, 1, 0.001)
    metrics.flush()
    metrics.count("acme", "v1", SUCCESS, 1, 0.001)  # in no file: the next write fails
    (tmp_path / "host_1.partial").mkdir()  # where this worker writes before it renames: every write fails
    (tmp_path / "host_2.json").write_bytes(
        WorkerTotals(worker="host:2", requests={("acme", "v1", SUCCESS): [5, 5]}).to_json()
    )

    samples = scrape(metrics)

    assert sample(samples, "kiln_inference_requests_total", org="acme", version="v1", outcome="success") == 7
    assert sample(samples, "kiln_models_loaded", worker="host:1") == 0


def test_a_worker_that_has_ended_still_counts_in_the_counters_but_no_longer_in_the_gauges(tmp_path: Path) -> None:
    """Sums of the gauges over workers must not count the models of a killed worker; its answers did happen."""
    metrics = metrics_in(tmp_path, "host:1")  # flushes every second
    ended = WorkerTotals(worker="host:2", requests={("acme", "v1", SUCCESS): [5, 50]}, models_loaded=3, models_mb=12.0)
    path = tmp_path / "host_2.json"
    path.write_bytes(ended.to_json())
    last_written = time.time() - STALE_FLUSHES * 1.0 - 1
    os.utime(path, (last_written, last_written))

    samples = scrape(metrics)

    assert sample(samples, "kiln_inference_requests_total", org="acme", version="v1", outcome="success") == 5
    assert sample(samples, "kiln_inference_rows_total", org="acme", version="v1") == 50
    gauges = {(name, labels) for name, labels in samples if name.startswith("kiln_models_")}
    assert gauges == {
        ("kiln_models_loaded", frozenset({("worker", "host:1")})),
        ("kiln_models_memory_mb", frozenset({("worker", "host:1")})),
    }
