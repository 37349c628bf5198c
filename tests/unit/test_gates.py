"""Holdout metrics, serving figures and the gates that decide whether a model may be deployed."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxmltools
import onnxruntime
import pytest
from onnxmltools.convert.common.data_types import FloatTensorType
from sklearn.metrics import accuracy_score, precision_score, recall_score

from deploy.local import ai4i
from services.trainer.pipeline import validate
from services.trainer.pipeline.data import TrainingData, split_holdout
from services.trainer.pipeline.export import booster_to_onnx, onnx_session
from services.trainer.pipeline.train import fit_booster
from services.trainer.pipeline.validate import (
    MB,
    FootprintProbe,
    GateReport,
    Gates,
    apply_gates,
    classification_metrics,
    measure_serving,
    parity,
)
from services.trainer.validation import judge
from shared.errors import InvalidInput, Stopped

AI4IData = Callable[..., TrainingData]
DEFAULT_HYPERPARAMETERS = {"objective": "binary", "num_iterations": 100, "num_leaves": 31, "learning_rate": 0.1}
GATE_NAMES = ["accuracy", "precision", "recall", "model_size_mb", "onnx_health", "parity"]
PASSING_METRICS = {"accuracy": 0.9, "precision": 0.9, "recall": 0.9}


def _train_and_gate(data: TrainingData) -> GateReport:
    """The trainer's path: hold out 20 %, fit, export, score the holdout with the ONNX model, gate."""
    train, holdout = split_holdout(data, 0.2, seed=0)
    booster = fit_booster(train, DEFAULT_HYPERPARAMETERS)
    model_bytes = booster_to_onnx(booster, len(data.feature_columns))
    probabilities = onnx_session(model_bytes).run(["probabilities"], {"input": holdout.features})[0]
    return apply_gates(
        metrics=classification_metrics(holdout.labels, probabilities),
        model_size_bytes=len(model_bytes),
        parity_diff=parity(booster, model_bytes, holdout.features),
        onnx_loads=True,
        gates=Gates(),
    )


def test_ai4i_passes_every_default_gate_on_a_20k_row_holdout(ai4i_data: AI4IData) -> None:
    report = _train_and_gate(ai4i_data(100_000))

    assert report["failed"] == []
    assert report["passed"] is True
    assert [gate["name"] for gate in report["gates"]] == GATE_NAMES


def test_unlearnable_labels_fail_and_the_report_names_the_failing_gates(ai4i_data: AI4IData) -> None:
    data = ai4i_data(100_000)
    shuffled = np.random.default_rng(1).permutation(data.labels)

    report = _train_and_gate(TrainingData(data.features, shuffled, data.classes, data.feature_columns))

    assert report["passed"] is False
    assert "recall" in report["failed"]
    assert report["failed"] == [gate["name"] for gate in report["gates"] if not gate["passed"]]
    # Predicting "no failure" everywhere is still 96 % accurate: accuracy alone would have let it through.
    assert "accuracy" not in report["failed"]


def test_a_gate_passes_at_its_threshold_and_fails_just_beyond_it() -> None:
    gates = Gates()
    at_limit = {"accuracy": 0.70, "precision": 0.70, "recall": 0.70}
    below = {**at_limit, "precision": 0.6999}

    report_at = apply_gates(metrics=at_limit, model_size_bytes=100 * MB, parity_diff=1e-5, onnx_loads=True, gates=gates)
    report_beyond = apply_gates(
        metrics=below, model_size_bytes=100 * MB + 1, parity_diff=1.1e-5, onnx_loads=True, gates=gates
    )

    assert report_at["passed"] is True
    assert report_beyond["failed"] == ["precision", "model_size_mb", "parity"]


def test_an_onnx_model_that_does_not_load_fails_health_and_parity() -> None:
    report = apply_gates(
        metrics=PASSING_METRICS, model_size_bytes=1000, parity_diff=None, onnx_loads=False, gates=Gates()
    )

    assert report["failed"] == ["onnx_health", "parity"]


def test_the_report_is_strict_json_even_with_undefined_values() -> None:
    report = apply_gates(
        metrics={**PASSING_METRICS, "recall": math.nan},
        model_size_bytes=1000,
        parity_diff=None,
        onnx_loads=True,
        gates=Gates(),
    )

    decoded = json.loads(json.dumps(report, allow_nan=False))
    recall = next(gate for gate in decoded["gates"] if gate["name"] == "recall")
    assert recall == {"name": "recall", "value": None, "threshold": 0.7, "passed": False}


def test_overrides_use_the_camel_case_names_clients_send() -> None:
    gates = Gates().with_overrides({"minRecall": 0.5, "maxModelMb": 10, "maxParityDiff": 1e-6})

    assert gates == Gates(min_recall=0.5, max_model_mb=10.0, max_parity_diff=1e-6)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"min_recall": 0.5}, "unknown gate 'min_recall'"),
        ({"minLatency": 1.0}, "unknown gate 'minLatency'"),
        ({"minRecall": math.nan}, "finite number"),
        ({"minRecall": True}, "finite number"),
    ],
)
def test_bad_overrides_are_refused(overrides: dict[str, float], says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as raised:
        Gates().with_overrides(overrides)

    assert raised.value.field == "gates"


def test_binary_metrics_count_class_one_as_positive_above_one_half() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    positive = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.4])

    metrics = classification_metrics(labels, np.column_stack([1 - positive, positive]))

    assert metrics == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "auc": 8 / 9, "rows": 6.0})


def test_multiclass_metrics_are_macro_averages() -> None:
    labels = np.array([0, 1, 2, 2])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])

    metrics = classification_metrics(labels, probabilities)

    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert metrics["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert 0.0 < metrics["auc"] <= 1.0


def test_auc_is_undefined_when_the_holdout_has_one_class() -> None:
    metrics = classification_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]))

    assert math.isnan(metrics["auc"])
    assert metrics["accuracy"] == 0.5


def test_serving_figures_describe_one_single_threaded_session(
    ai4i_data: AI4IData, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ai4i_data(5000)
    model_bytes = booster_to_onnx(fit_booster(data, DEFAULT_HYPERPARAMETERS), len(data.feature_columns))
    sessions: list[onnxruntime.InferenceSession] = []

    def kept(model_bytes: bytes) -> onnxruntime.InferenceSession:
        sessions.append(onnx_session(model_bytes))
        return sessions[-1]

    monkeypatch.setattr(validate, "onnx_session", kept)
    figures = measure_serving(model_bytes, data.features[:300])

    assert set(figures) == {"latency_p50_ms", "latency_p99_ms", "batch_rows_per_s", "memory_mb_rss_growth"}
    assert all(math.isfinite(value) and value > 0 for value in figures.values()), figures
    assert figures["latency_p50_ms"] <= figures["latency_p99_ms"]
    (session,) = sessions  # every figure from one session, which runs on one thread as the predictor's does
    options = session.get_session_options()
    threads = (options.intra_op_num_threads, options.inter_op_num_threads, options.execution_mode)
    assert threads == (1, 1, onnxruntime.ExecutionMode.ORT_SEQUENTIAL)
    # A 100-tree model costs about 1.2 MB here; onnxruntime's own start-up (~13 MB) must not be counted.
    assert 0.1 < figures["memory_mb_rss_growth"] < 10


@pytest.mark.parametrize("n_classes", [2, 4])
def test_metrics_from_the_confusion_matrix_agree_with_scikit_learn(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes - 1 if n_classes > 2 else n_classes, 5000)  # one class never occurs
    probabilities = rng.random((5000, n_classes))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    average = "binary" if n_classes == 2 else "macro"
    metrics = classification_metrics(labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["precision"] == pytest.approx(precision_score(labels, predicted, average=average, zero_division=0))
    assert metrics["recall"] == pytest.approx(recall_score(labels, predicted, average=average, zero_division=0))


def _probes_running() -> list[int]:
    """This process's children running the memory probe's interpreter."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parent = int(stat.rsplit(b")", 1)[1].split()[1])
            if parent == os.getpid() and b"resident()" in command:
                found.append(int(entry.name))
    return found


@pytest.fixture
def probe_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder, where a memory probe once put its copy of the model."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_memory_probe_whose_figure_is_not_wanted_is_stopped_and_writes_no_copy_of_the_model(
    ai4i_data: AI4IData, probe_folder: Path
) -> None:
    """No copy at any time, so a worker killed while its probe runs leaves none behind either."""
    data = ai4i_data(2000)
    model_bytes = booster_to_onnx(fit_booster(data, DEFAULT_HYPERPARAMETERS), len(data.feature_columns))

    with FootprintProbe.start(model_bytes, len(data.feature_columns)):
        assert _probes_running()
        assert list(probe_folder.iterdir()) == []

    assert _probes_running() == []
    assert list(probe_folder.iterdir()) == []


def test_judging_a_model_onnxruntime_cannot_run_stops_the_memory_probe_handed_to_it(
    ai4i_data: AI4IData, probe_folder: Path
) -> None:
    data = ai4i_data(2000)
    model_bytes = booster_to_onnx(fit_booster(data, DEFAULT_HYPERPARAMETERS), len(data.feature_columns))
    probe = FootprintProbe.start(model_bytes, len(data.feature_columns))

    verdict = judge(b"not an onnx model", None, data, Gates(), footprint=probe)

    assert "does not run in onnxruntime" in verdict.report["note"]
    assert _probes_running() == []
    assert list(probe_folder.iterdir()) == []


_CONSTANTS = {"from0": 0, "to2": 2, "to3": 3, "axis1": 1}


def _graph_answering(
    nodes: list[onnx.NodeProto], *, dtype: int = onnx.TensorProto.FLOAT, width: int | str = len(ai4i.FEATURES)
) -> bytes:
    """A model from "input" ([rows, width]) to "probabilities" through `nodes`, as a custom training script might
    export one."""
    constants = [onnx.numpy_helper.from_array(np.array([v], np.int64), name) for name, v in _CONSTANTS.items()]
    graph = onnx.helper.make_graph(
        nodes,
        "answers",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, width])],
        [onnx.helper.make_tensor_value_info("probabilities", dtype, None)],
        initializer=[*constants, onnx.numpy_helper.from_array(np.array([math.nan], np.float32), "nan")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _first_columns(n_columns: int) -> onnx.NodeProto:
    return onnx.helper.make_node("Slice", ["input", "from0", f"to{n_columns}", "axis1"], ["columns"])


def _contract_breakers() -> dict[str, tuple[bytes, str]]:
    """Models that load and run yet answer something else than [N, 2] finite floats, with the words that say so."""
    make_node = onnx.helper.make_node
    return {
        "one figure a row": (
            _graph_answering([make_node("ReduceMax", ["input"], ["probabilities"], axes=[1], keepdims=0)]),
            "got float32 [400] for 400 rows",
        ),
        "three columns for two classes": (
            _graph_answering([_first_columns(3), make_node("Softmax", ["columns"], ["probabilities"], axis=1)]),
            "got float32 [400, 3] for 400 rows",
        ),
        "integers": (
            _graph_answering(
                [_first_columns(2), make_node("Cast", ["columns"], ["probabilities"], to=onnx.TensorProto.INT64)],
                dtype=onnx.TensorProto.INT64,
            ),
            "got int64 [400, 2] for 400 rows",
        ),
        "NaN": (
            _graph_answering([_first_columns(2), make_node("Mul", ["columns", "nan"], ["probabilities"])]),
            "of finite values, got NaN or infinity in 400 of 400 rows",
        ),
    }


@pytest.mark.parametrize("calls_before_the_stop", [0, 1, 100, 230])  # holdout, warm-up, latency, batches
def test_a_judgement_asked_to_stop_stops_between_the_models_calls(
    ai4i_data: AI4IData, calls_before_the_stop: int
) -> None:
    """A cancel waited for the whole judgement: the holdout pass, then hundreds of latency and batch calls, which
    for a model slow to run took as long as the model made them."""
    data = ai4i_data(2_000)
    model_bytes = booster_to_onnx(fit_booster(data, DEFAULT_HYPERPARAMETERS), len(data.feature_columns))
    looks: list[bool] = []

    def stop_after_some_calls() -> bool:
        looks.append(len(looks) >= calls_before_the_stop)
        return looks[-1]

    with pytest.raises(Stopped):
        judge(model_bytes, None, data, Gates(), should_stop=stop_after_some_calls)
    assert looks.count(True) == 1


@pytest.mark.parametrize("case", sorted(_contract_breakers()))
def test_a_model_answering_other_than_finite_probabilities_per_class_fails_onnx_health_saying_what_it_gave(
    ai4i_data: AI4IData, case: str
) -> None:
    model, words = _contract_breakers()[case]
    holdout = ai4i_data(400)

    verdict = judge(model, None, holdout, Gates())

    assert verdict.report["failed"] == ["accuracy", "precision", "recall", "onnx_health", "parity"]
    assert verdict.report["note"].startswith(
        "the stored model.onnx breaks the serving contract: probabilities must be a float tensor [N, 2]"
    )
    assert verdict.report["note"].endswith(words), verdict.report["note"]


@pytest.mark.parametrize("width", ["features", len(ai4i.FEATURES) + 1])
def test_a_model_whose_input_is_not_as_wide_as_the_features_fails_onnx_health_as_a_predictor_would_refuse_it(
    ai4i_data: AI4IData, width: int | str
) -> None:
    """A width by name ran on every held-out row, and the version passed its gates; no predictor would load it."""
    make_node = onnx.helper.make_node
    nodes = [_first_columns(2), make_node("Softmax", ["columns"], ["probabilities"], axis=1)]

    verdict = judge(_graph_answering(nodes, width=width), None, ai4i_data(400), Gates())

    assert "onnx_health" in verdict.report["failed"]
    assert verdict.report["note"] == (
        "the stored model.onnx breaks the serving contract: expected one input 'input' with "
        f"{len(ai4i.FEATURES)} features, found [('input', [None, {width!r}])]"
    )


def test_onnxmltools_default_export_with_a_zipmap_fails_onnx_health_naming_the_option_that_avoids_it(
    ai4i_data: AI4IData,
) -> None:
    data = ai4i_data(400)
    booster = fit_booster(data, DEFAULT_HYPERPARAMETERS)
    initial_types = [("input", FloatTensorType([None, len(data.feature_columns)]))]
    model = onnxmltools.convert_lightgbm(booster, initial_types=initial_types, target_opset=15)

    verdict = judge(model.SerializeToString(), None, data, Gates())

    assert "onnx_health" in verdict.report["failed"]
    assert verdict.report["note"].endswith(
        "got a list of 400 maps (onnxmltools' default ZipMap: convert with zipmap=False)"
    ), verdict.report["note"]
