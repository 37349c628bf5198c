"""What a trained model is judged on before it may be deployed: holdout metrics, ONNX parity with the
booster, serving cost, and the gates those figures must clear."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import BinaryIO, TypedDict

import lightgbm
import numpy as np
import onnxruntime
from sklearn.metrics import roc_auc_score

from services.trainer.pipeline.export import onnx_session
from services.trainer.pipeline.train import predict_proba
from shared.cut_off import never
from shared.errors import InvalidInput, Stopped
from shared.model_contract import INPUT_NAME, PROBABILITIES_OUTPUT

MB = 1024 * 1024
_PARITY_CHUNK_ROWS = 100_000
_WARMUP_CALLS = 20
_TIMED_CALLS = 200
_BATCH_ROWS = 1000
_TIMED_BATCHES = 20
_PROBE_TIMEOUT_S = 60

# Runs in a fresh interpreter that imports only onnxruntime, so it starts in a fraction of a second. The
# session options mirror export.onnx_session; the first session absorbs onnxruntime's one-off start-up.
_FOOTPRINT_PROBE = """
import os, sys
import numpy as np
import onnxruntime

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def load(model, n_features):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    session.run(None, {input_name: np.zeros((1, n_features), np.float32)})
    return session

n_features, input_name = int(sys.argv[1]), sys.argv[2]
model = sys.stdin.buffer.read()
first = load(model, n_features)
before = resident()
second = load(model, n_features)
print(resident() - before)
"""


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and AUC of [n, c] probabilities against class-index labels.

    Two classes: class 1 is the positive one, predicted when its probability exceeds 0.5. More classes:
    precision and recall are macro averages over the classes that occur, and AUC is one-vs-rest. AUC is NaN
    when the labels lack a class, since it is undefined there.
    """
    confusion = _confusion(labels, probabilities)
    precision, recall = _precision_recall(confusion)
    if probabilities.shape[1] == 2:
        summary_precision, summary_recall = precision[1], recall[1]
    else:
        occurring = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
        summary_precision, summary_recall = precision[occurring].mean(), recall[occurring].mean()
    return {
        "accuracy": float(np.trace(confusion) / max(labels.shape[0], 1)),
        "precision": float(summary_precision),
        "recall": float(summary_recall),
        "auc": _auc(labels, probabilities),
        "rows": float(labels.shape[0]),
    }


def per_class_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[object]) -> dict[str, object]:
    """Precision, recall and support of each class, keyed by the class as the target column holds it."""
    confusion = _confusion(labels, probabilities)
    precision, recall = _precision_recall(confusion)
    support = confusion.sum(axis=1)
    return {
        str(value): {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(support[i])}
        for i, value in enumerate(classes)
    }


def _confusion(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Counts by [true class, predicted class]: one pass of bincount, where sklearn's scorers take several."""
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    cells = np.bincount(labels.astype(np.int64) * n_classes + predicted, minlength=n_classes * n_classes)
    return cells.reshape(n_classes, n_classes)


def _precision_recall(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class; 0 where a class was never predicted (precision) or never occurs (recall), as sklearn's
    zero_division=0 has it."""
    hits = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    return precision, recall


def max_abs_difference(native: np.ndarray, served: np.ndarray) -> float:
    return float(np.abs(native - served).max()) if native.size else 0.0


def parity(booster: lightgbm.Booster, model_bytes: bytes, features: np.ndarray) -> float:
    """The largest absolute difference between the booster's and the ONNX model's probabilities."""
    session = onnx_session(model_bytes)
    worst = 0.0
    for start in range(0, features.shape[0], _PARITY_CHUNK_ROWS):
        chunk = features[start : start + _PARITY_CHUNK_ROWS]
        served = session.run([PROBABILITIES_OUTPUT], {INPUT_NAME: chunk})[0]
        worst = max(worst, float(np.abs(predict_proba(booster, chunk) - served).max()))
    return worst


def measure_serving(
    model_bytes: bytes,
    features: np.ndarray,
    *,
    footprint: FootprintProbe | None = None,
    should_stop: Callable[[], bool] = never,
) -> dict[str, float]:
    """Single-row latency, 1000-row batch throughput and memory of one session, as the predictor runs it.

    Memory ("memory_mb_rss_growth") is the resident-set growth from loading the model into a fresh
    interpreter that already holds one session, so it is this model's own cost, not onnxruntime's start-up;
    in this process freed memory gets reused and the growth reads near zero. Without /proc, the model's
    size stands in ("memory_mb_model_size"). A probe started earlier may be passed in, so that its interpreter
    starts while other work runs. Stopped between calls once `should_stop()`: a model slow to run makes hundreds of
    slow calls.
    """
    if features.shape[0] == 0:
        raise ValueError("serving cost needs at least one row to send")
    with footprint or FootprintProbe.start(model_bytes, features.shape[1]) as probe:
        session = onnx_session(model_bytes)
        latencies_ms = _single_row_latencies_ms(_stopping(session, should_stop), features)
        growth = probe.result()
    if growth is None:
        memory = {"memory_mb_model_size": len(model_bytes) / MB}
    else:
        memory = {"memory_mb_rss_growth": max(growth, 0) / MB}
    return {
        "latency_p50_ms": float(np.percentile(latencies_ms, 50)),
        "latency_p99_ms": float(np.percentile(latencies_ms, 99)),
        "batch_rows_per_s": _batch_rows_per_s(_stopping(session, should_stop), features),
        **memory,
    }


class FootprintProbe:
    """The memory one more session of a model takes, measured in a fresh interpreter (see measure_serving)."""

    def __init__(self, process: subprocess.Popen[bytes] | None, feeder: threading.Thread | None) -> None:
        self._process = process
        self._feeder = feeder

    @classmethod
    def start(cls, model_bytes: bytes, n_features: int) -> FootprintProbe:
        """The model goes to the probe through a pipe, not a file: a worker killed meanwhile leaves no copy of it."""
        command = [sys.executable, "-c", _FOOTPRINT_PROBE, str(n_features), INPUT_NAME]
        # A pipe of its own rather than stdin=PIPE: communicate() would close that under the feeding thread.
        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen(command, stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:
            os.close(write_end)
            return cls(None, None)
        finally:
            os.close(read_end)
        # Fed from a thread: the probe reads only once its interpreter is up, and the caller goes on meanwhile.
        sink = os.fdopen(write_end, "wb")
        feeder = threading.Thread(target=_feed, args=(sink, model_bytes), name="footprint-feed", daemon=True)
        feeder.start()
        return cls(process, feeder)

    def __enter__(self) -> FootprintProbe:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the probe if it still runs, its figure unwanted."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
        if self._feeder is not None:
            self._feeder.join()

    def result(self) -> int | None:
        """Bytes of resident-set growth, or None when the probe could not measure it."""
        if self._process is None:
            return None
        try:
            output, _ = self._process.communicate(timeout=_PROBE_TIMEOUT_S)
            return int(output) if self._process.returncode == 0 else None
        except (subprocess.SubprocessError, ValueError):
            return None
        finally:
            self.close()


def _feed(sink: BinaryIO, model_bytes: bytes) -> None:
    with contextlib.suppress(OSError), sink:  # a probe that died or was killed reads no more
        sink.write(model_bytes)


@dataclass(frozen=True)
class Gates:
    """Thresholds a model must meet to be deployable; overridable per training run."""

    min_accuracy: float = 0.70
    min_precision: float = 0.70
    min_recall: float = 0.70
    max_model_mb: float = 100.0
    max_parity_diff: float = 1e-5

    def with_overrides(self, overrides: Mapping[str, float]) -> Gates:
        """These gates with some thresholds replaced, named in camelCase as clients send them."""
        names = {_camel_case(field.name): field.name for field in fields(self)}
        changes: dict[str, float] = {}
        for key, value in overrides.items():
            if key not in names:
                raise InvalidInput(f"unknown gate {key!r}; known gates are {', '.join(sorted(names))}", field="gates")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidInput(f"gate {key!r} needs a finite number, not {value!r}", field="gates")
            changes[names[key]] = float(value)
        return replace(self, **changes)


class GateCheck(TypedDict):
    name: str
    value: float | bool | None
    threshold: float | bool
    passed: bool


class GateReport(TypedDict):
    passed: bool
    gates: list[GateCheck]
    failed: list[str]


def apply_gates(
    *,
    metrics: Mapping[str, float],
    model_size_bytes: int,
    parity_diff: float | None,
    onnx_loads: bool,
    gates: Gates,
) -> GateReport:
    """Every gate's verdict, JSON-ready. `parity_diff` is None when it could not be measured, which fails."""
    checks = [
        _at_least("accuracy", metrics["accuracy"], gates.min_accuracy),
        _at_least("precision", metrics["precision"], gates.min_precision),
        _at_least("recall", metrics["recall"], gates.min_recall),
        _at_most("model_size_mb", model_size_bytes / MB, gates.max_model_mb),
        GateCheck(name="onnx_health", value=onnx_loads, threshold=True, passed=onnx_loads),
        _at_most("parity", parity_diff, gates.max_parity_diff),
    ]
    failed = [check["name"] for check in checks if not check["passed"]]
    return GateReport(passed=not failed, gates=checks, failed=failed)


def _auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    n_classes = probabilities.shape[1]
    if np.unique(labels).size < n_classes:
        return math.nan
    if n_classes == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


Run = Callable[[np.ndarray], object]


def _stopping(session: onnxruntime.InferenceSession, should_stop: Callable[[], bool]) -> Run:
    """One call of the session on some rows, each raising Stopped first once `should_stop()`."""

    def run(rows: np.ndarray) -> object:
        if should_stop():
            raise Stopped("stopped while measuring the serving cost")
        return session.run([PROBABILITIES_OUTPUT], {INPUT_NAME: rows})

    return run


def _single_row_latencies_ms(run: Run, features: np.ndarray) -> np.ndarray:
    n_rows = features.shape[0]
    for call in range(_WARMUP_CALLS):
        run(features[call % n_rows : call % n_rows + 1])
    latencies_ns = np.empty(_TIMED_CALLS)
    for call in range(_TIMED_CALLS):
        row = features[call % n_rows : call % n_rows + 1]
        started = time.perf_counter_ns()
        run(row)
        latencies_ns[call] = time.perf_counter_ns() - started
    return latencies_ns / 1e6


def _batch_rows_per_s(run: Run, features: np.ndarray) -> float:
    # A holdout smaller than a batch is repeated to fill it, so every figure is for the same batch size.
    batch = np.ascontiguousarray(np.resize(features[:_BATCH_ROWS], (_BATCH_ROWS, features.shape[1])))
    run(batch)
    started = time.perf_counter()
    for _ in range(_TIMED_BATCHES):
        run(batch)
    return _BATCH_ROWS * _TIMED_BATCHES / (time.perf_counter() - started)


def _camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _at_least(name: str, value: float, threshold: float) -> GateCheck:
    return GateCheck(name=name, value=_finite_or_none(value), threshold=threshold, passed=value >= threshold)


def _at_most(name: str, value: float | None, threshold: float) -> GateCheck:
    passed = value is not None and value <= threshold
    return GateCheck(name=name, value=_finite_or_none(value), threshold=threshold, passed=passed)
