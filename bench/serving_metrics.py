"""What counting a request for /metrics costs the predictor, against parsing the same single-row V2 request,
one of the steps every infer takes anyway, in the same process.

    .venv/bin/python bench/serving_metrics.py [--requests 1000000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import orjson

from services.predictor import oip
from services.predictor.metrics import SUCCESS, ServingMetrics
from services.predictor.models import ModelCache
from services.predictor.records import PredictionRecorder
from shared.db.session import make_engine, make_session_factory

VERSION = "v2026-11-26T07-35-21-275Z_e06817af"
BODY = orjson.dumps(
    {"inputs": [{"name": "input", "shape": [1, 6], "datatype": "FP32", "data": [0, 300.1, 310.2, 1305.7, 68.3, 173]}]}
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    requests = parser.parse_args().requests
    recorder = PredictionRecorder(make_session_factory(make_engine("sqlite://")), flush_s=1.0)  # never started
    metrics = ServingMetrics(None, "bench:1", 1.0, ModelCache(budget_mb=64), recorder)
    counting = per_call_us(lambda: metrics.count("acme", VERSION, SUCCESS, 1, 0.0003), requests)
    parsing = per_call_us(lambda: oip.parse_request(BODY, None), requests // 10)
    print(f"counting a request        {counting:6.2f} us")
    print(f"parsing a single-row body {parsing:6.2f} us")
    print(f"counting / parsing        {counting / parsing:6.3f}")


def per_call_us(call: Callable[[], object], times: int) -> float:
    """Microseconds per call, less the loop's own cost."""
    started = time.perf_counter()
    for _ in range(times):
        call()
    spent = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(times):
        (lambda: None)()
    return (spent - (time.perf_counter() - started)) / times * 1e6


if __name__ == "__main__":
    main()
