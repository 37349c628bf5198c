"""Judging a model as it will be served: the stored ONNX artifact run on the held-out rows, against the booster
and the gates. Used when a run finishes and again when an operator asks (`POST .../models/{version}/validate`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime

from services.trainer.native_scores import NativeScores
from services.trainer.pipeline.data import TrainingData
from services.trainer.pipeline.validate import (
    MB,
    FootprintProbe,
    Gates,
    apply_gates,
    classification_metrics,
    max_abs_difference,
    measure_serving,
    per_class_metrics,
)
from shared.cut_off import never
from shared.errors import Stopped
from shared.model_contract import INPUT_NAME, PROBABILITIES_OUTPUT, signature_problem
from shared.onnx_external import external_data_of, keeps_data_outside
from shared.schemas import OrgConfig

CHUNK_ROWS = 100_000
_LARGEST_FILE_BYTES = 2**63
UNMEASURED = {"accuracy": math.nan, "precision": math.nan, "recall": math.nan}


@dataclass(frozen=True)
class Verdict:
    metrics: dict[str, Any]
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def gates_for(org_config: OrgConfig) -> Gates:
    """The default gates with the org's own thresholds in place."""
    return Gates().with_overrides(org_config.gates.model_dump(by_alias=True, exclude_none=True))


def too_large(model_size_bytes: int, gates: Gates) -> bool:
    """The size gate, checked before anything is uploaded."""
    return model_size_bytes > size_gate_bytes(gates)


def size_gate_bytes(gates: Gates) -> int:
    """The most bytes a model may have and pass the size gate."""
    # An org's gate may be any finite figure, even one whose bytes overflow a float: no file is larger than this.
    return math.floor(min(gates.max_model_mb * MB, _LARGEST_FILE_BYTES))


def judge(
    model: bytes,
    native: NativeScores | None,
    holdout: TrainingData,
    gates: Gates,
    *,
    footprint: FootprintProbe | None = None,
    should_stop: Callable[[], bool] = never,
) -> Verdict:
    """Every gate on `model` (bytes read back from the store): health, holdout metrics, parity against `native`
    (the booster's answers on the held-out rows; None when the version has no model.txt), size, cost.

        `footprint` is a memory probe of these bytes started earlier, while the caller had a core to spare; without
        one, the probe starts here and loads while this process does the rest. Stopped (raised) between the
        model's calls once `should_stop()`: a cancel waited for the whole judgement of a model slow to run."""
    outside = external_data_of(model)
    if outside:  # before any process loads it, the memory probe's included
        return unhealthy(len(model), gates, f"{keeps_data_outside(outside)}, which Kiln does not load")
    with footprint or FootprintProbe.start(model, holdout.features.shape[1]) as probe:
        try:
            served = _served_probabilities(model, holdout.features, len(holdout.classes), should_stop)
        except Stopped:
            raise
        except BrokenServingContract as error:
            return unhealthy(len(model), gates, f"breaks the serving contract: {error}")
        except Exception as error:
            return unhealthy(len(model), gates, f"does not run in onnxruntime: {type(error).__name__}: {error}")
        metrics = _finite(classification_metrics(holdout.labels, served))
        if len(holdout.classes) > 2:
            metrics["perClass"] = per_class_metrics(holdout.labels, served, list(holdout.classes))
        parity_diff = None
        if native is not None and native.probabilities is not None:
            parity_diff = max_abs_difference(native.probabilities, served)
        report: dict[str, Any] = dict(
            apply_gates(
                metrics=metrics, model_size_bytes=len(model), parity_diff=parity_diff, onnx_loads=True, gates=gates
            )
        )
        if native is not None and native.problem is not None:
            report["note"] = f"the stored model.txt {native.problem}"
        report["serving"] = measure_serving(model, holdout.features, footprint=probe, should_stop=should_stop)
    return Verdict(metrics=metrics, report=report)


def size_rejection(model_size_bytes: int, gates: Gates) -> Verdict:
    """The verdict on a model too large to upload: nothing else about it is measured."""
    return _unmeasured(
        model_size_bytes, gates, "model.onnx is over the size gate, so it was neither uploaded nor measured"
    )


def unhealthy(model_size_bytes: int, gates: Gates, reason: str) -> Verdict:
    """The verdict on a stored model that cannot be run: every gate that needs it fails, with the reason."""
    return _unmeasured(model_size_bytes, gates, f"the stored model.onnx {reason}")


def _unmeasured(model_size_bytes: int, gates: Gates, note: str) -> Verdict:
    unmeasured = {"accuracy": math.nan, "precision": math.nan, "recall": math.nan}
    checks = apply_gates(
        metrics=unmeasured, model_size_bytes=model_size_bytes, parity_diff=None, onnx_loads=False, gates=gates
    )
    return Verdict(metrics={}, report={**checks, "note": note})


class BrokenServingContract(ValueError):
    """The model runs, but its signature (shared/model_contract.py) or what it answers is not what every reader of it
    expects: `probabilities` of the held-out rows."""


def _served_probabilities(
    model: bytes, features: np.ndarray, n_classes: int, should_stop: Callable[[], bool]
) -> np.ndarray:
    """The model's answers on every held-out row, on as many threads as the machine has: this is a batch job."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    problem = signature_problem(session.get_inputs(), session.get_outputs(), features.shape[1])
    if problem is not None:
        raise BrokenServingContract(problem)  # the predictor would refuse to load it
    parts = []
    for start in range(0, features.shape[0], CHUNK_ROWS):
        if should_stop():
            raise Stopped("stopped while the held-out rows were scored")
        chunk = features[start : start + CHUNK_ROWS]
        answer = session.run([PROBABILITIES_OUTPUT], {INPUT_NAME: chunk})[0]
        parts.append(_checked_probabilities(answer, chunk.shape[0], n_classes))
    return np.concatenate(parts)


def _checked_probabilities(answer: object, rows: int, n_classes: int) -> np.ndarray:
    """`answer` if it is a finite float array [rows, n_classes], else BrokenServingContract saying what it is.

    The metrics, parity and the predictor index it so: anything else (a custom script's one column a row, a column
    too many, NaN, onnxmltools' default ZipMap of dicts) would fail them deep inside rather than fail the gate."""
    wanted = f"probabilities must be a float tensor [N, {n_classes}]"
    if not isinstance(answer, np.ndarray):
        raise BrokenServingContract(f"{wanted}, got {_described(answer)}")
    if not np.issubdtype(answer.dtype, np.floating) or answer.shape != (rows, n_classes):
        raise BrokenServingContract(f"{wanted}, got {answer.dtype} {list(answer.shape)} for {rows} rows")
    non_finite = int((~np.isfinite(answer)).any(axis=1).sum())
    if non_finite:
        raise BrokenServingContract(f"{wanted} of finite values, got NaN or infinity in {non_finite} of {rows} rows")
    return answer


def _described(answer: object) -> str:
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        return f"a list of {len(answer)} maps (onnxmltools' default ZipMap: convert with zipmap=False)"
    return f"a {type(answer).__name__}"


def _finite(metrics: dict[str, float]) -> dict[str, Any]:
    """JSON has no NaN (an AUC on a one-class holdout): such a figure is stored as null."""
    return {name: value if math.isfinite(value) else None for name, value in metrics.items()}
