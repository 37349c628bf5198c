"""Serving metrics for Prometheus, at `GET /metrics`: requests, rows and latency per org and version (as Triton's
nv_inference_* metrics count them), and what each worker process has loaded.

A request pays a few additions to plain dicts in its own worker process: no lock, no write. Every
KILN_PREDICTOR_METRICS_FLUSH_S each worker writes its totals to a file of its own in KILN_PREDICTOR_METRICS_DIR.
/metrics, whichever worker answers it, writes its own file first and then adds up every file there: all the
predictor's workers, the answering one up to the moment, the others at most one flush behind (a worker that cannot
write its file adds its live totals to the others' files instead). Reading only the
files keeps each counter from ever going back from one scrape to the next, whichever worker answers each (a worker
adding its live totals to the others' files would not: Prometheus takes a counter that goes back for a restart).
Files of workers that have ended stay, so totals never go back either, but their gauges (the models a worker holds)
are left out once their file has gone STALE_FLUSHES flush intervals without being rewritten: the sums over workers
would otherwise count the models of a process that no longer holds any. The folder must be the predictor's own and
empty at its start (`kiln up` and docker-compose see to that). Without a folder, /metrics shows the answering
process's totals only, which is right for a predictor of one worker process.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from services.predictor.models import ModelCache
from services.predictor.records import PredictionRecorder

log = logging.getLogger(__name__)

SUCCESS = "success"
REFUSED = "refused"  # the request was wrong: a 4xx answer
FAILURE = "failure"  # the predictor failed it: a 5xx answer
DISCONNECTED = "disconnected"  # the client hung up before its whole body had come: no answer could reach it
# Upper bounds of the latency buckets, in seconds: a single row takes ~0.1 ms in process, a 1000-row batch ~1.5 ms.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A live worker rewrites its file every flush interval, from its event loop; one left alone this many intervals is
# a worker that has ended (killed, or stopped and replaced). Several intervals, so that a loop kept busy for a
# moment does not take a live worker's gauges out.
STALE_FLUSHES = 5


@dataclass
class Latency:
    """A histogram of one org's request times: a count per bucket of LATENCY_BUCKETS, then +Inf."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    sum_s: float = 0.0


@dataclass
class WorkerTotals:
    """One worker process's counts since it started."""

    worker: str
    # (org, version, outcome) -> [requests, rows]
    requests: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    latency: dict[str, Latency] = field(default_factory=dict)
    models_loaded: int = 0
    models_mb: float = 0.0
    records_dropped: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "worker": self.worker,
                "requests": [[*key, *counts] for key, counts in self.requests.items()],
                "latency": [[org, times.buckets, times.sum_s] for org, times in self.latency.items()],
                "modelsLoaded": self.models_loaded,
                "modelsMb": self.models_mb,
                "recordsDropped": self.records_dropped,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> WorkerTotals:
        raw = orjson.loads(data)
        return cls(
            worker=raw["worker"],
            requests={(org, version, outcome): [n, rows] for org, version, outcome, n, rows in raw["requests"]},
            latency={org: Latency(buckets, sum_s) for org, buckets, sum_s in raw["latency"]},
            models_loaded=raw["modelsLoaded"],
            models_mb=raw["modelsMb"],
            records_dropped=raw["recordsDropped"],
        )


class ServingMetrics:
    """This worker process's serving metrics, and the way to all of the predictor's."""

    def __init__(
        self, folder: Path | None, worker: str, flush_s: float, cache: ModelCache, recorder: PredictionRecorder
    ) -> None:
        self.totals = WorkerTotals(worker=worker)
        self._cache = cache
        self._recorder = recorder
        self._folder = folder
        self._flush_s = flush_s
        self._task: asyncio.Task[None] | None = None

    def count(self, org: str, version: str, outcome: str, rows: int, seconds: float) -> None:
        """One answered request. `org` and `version` are "" when no model was found for it, so that made-up org
        names in URLs cannot add series."""
        key = (org, version, outcome)
        counts = self.totals.requests.get(key)
        if counts is None:
            counts = self.totals.requests[key] = [0, 0]
        counts[0] += 1
        counts[1] += rows
        if outcome == SUCCESS:
            times = self.totals.latency.get(org)
            if times is None:
                times = self.totals.latency[org] = Latency()
            times.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            times.sum_s += seconds

    def start(self) -> None:
        """Write this worker's totals every flush interval, from the event loop that counts them."""
        if self._folder is not None:
            self._folder.mkdir(parents=True, exist_ok=True)
            self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._flush_or_warn()

    def flush(self) -> None:
        if self._folder is None:
            return
        path = self._folder / (re.sub(r"[^\w.-]", "_", self.totals.worker) + ".json")
        partial = path.with_suffix(".partial")
        partial.write_bytes(self._current().to_json())
        partial.replace(path)

    def exposition(self) -> Iterable[Metric]:
        """Every worker's totals, added up, as Prometheus metric families."""
        if self._folder is None:
            current = self._current()
            return _families([current], live=[current])
        written = self._flush_or_warn()
        flushed = list(self._flushed())
        if not written:
            # This worker's file is missing or behind: its live totals stand in for it, beside the others' files.
            current = self._current()
            flushed = [
                *((totals, live) for totals, live in flushed if totals.worker != current.worker),
                (current, True),
            ]
        return _families([totals for totals, _ in flushed], live=[totals for totals, live in flushed if live])

    def _current(self) -> WorkerTotals:
        self.totals.models_loaded = len(self._cache.versions())
        self.totals.models_mb = self._cache.used_mb()
        self.totals.records_dropped = self._recorder.dropped
        return self.totals

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Exposed(self))
        return registry

    def _flushed(self) -> Iterator[tuple[WorkerTotals, bool]]:
        """Every worker's totals, each with whether the worker still rewrites them (is alive)."""
        assert self._folder is not None
        written_since = time.time() - STALE_FLUSHES * self._flush_s
        for path in sorted(self._folder.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError, KeyError, ValueError):
                yield WorkerTotals.from_json(path.read_bytes()), path.stat().st_mtime >= written_since

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            self._flush_or_warn()

    def _flush_or_warn(self) -> bool:
        """Whether this worker's file is written. A full disk or a folder removed is logged, not raised: the next
        flush tries again, rather than this worker's counts freezing for good or a scrape failing."""
        try:
            self.flush()
        except OSError:
            log.warning("could not write this worker's metrics to %s", self._folder, exc_info=True)
            return False
        return True


class _Exposed(Collector):
    def __init__(self, metrics: ServingMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.exposition()


def _families(workers: list[WorkerTotals], *, live: list[WorkerTotals]) -> list[Metric]:
    """Counters summed over every worker that ever counted, ended ones included (a counter never goes back);
    gauges for the live workers only."""
    requests = CounterMetricFamily(
        "kiln_inference_requests",
        "Inference requests, by org, version and outcome (disconnected: the client hung up before its body came).",
        labels=["org", "version", "outcome"],
    )
    rows = CounterMetricFamily(
        "kiln_inference_rows", "Rows predicted in successful requests, by org and version.", labels=["org", "version"]
    )
    latency = HistogramMetricFamily(
        "kiln_inference_request_duration_seconds",
        "Time from a successful request's arrival to its answer, in the predictor, by org.",
        labels=["org"],
    )
    loaded = GaugeMetricFamily("kiln_models_loaded", "Models loaded, by worker process.", labels=["worker"])
    memory = GaugeMetricFamily(
        "kiln_models_memory_mb", "Memory of the loaded models, by worker process.", labels=["worker"]
    )
    dropped = CounterMetricFamily(
        "kiln_prediction_records_dropped",
        "Prediction records dropped because the database kept them waiting, or refused them.",
    )
    summed_requests: dict[tuple[str, str, str], list[int]] = {}
    summed_latency: dict[str, Latency] = {}
    for worker in workers:
        for key, (count, row_count) in worker.requests.items():
            total = summed_requests.setdefault(key, [0, 0])
            total[0] += count
            total[1] += row_count
        for org, times in worker.latency.items():
            summed = summed_latency.setdefault(org, Latency())
            summed.buckets = [a + b for a, b in zip(summed.buckets, times.buckets, strict=True)]
            summed.sum_s += times.sum_s
    for worker in live:
        loaded.add_metric([worker.worker], worker.models_loaded)
        memory.add_metric([worker.worker], worker.models_mb)
    for (org, version, outcome), (count, row_count) in sorted(summed_requests.items()):
        requests.add_metric([org, version, outcome], count)
        if outcome == SUCCESS:
            rows.add_metric([org, version], row_count)
    for org, times in sorted(summed_latency.items()):
        latency.add_metric([org], _cumulative(times.buckets), times.sum_s)
    dropped.add_metric([], sum(worker.records_dropped for worker in workers))
    return [requests, rows, latency, loaded, memory, dropped]


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    bounds = [*(str(bound) for bound in LATENCY_BUCKETS), "+Inf"]
    running, buckets = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        running += count
        buckets.append((bound, float(running)))
    return buckets
