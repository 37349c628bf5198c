"""The ONNX export decides exactly as LightGBM does, where the stock conversion does not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightgbm
import numpy as np
import onnx
import pytest

from deploy.local import ai4i
from services.trainer.pipeline.data import TrainingData, load_training_data
from services.trainer.pipeline.export import (
    ExportMismatch,
    booster_to_onnx,
    convert_stock,
    floor_thresholds,
    onnx_session,
)
from services.trainer.pipeline.train import fit_booster, predict_proba
from services.trainer.pipeline.validate import parity
from shared.errors import InvalidInput

AI4IData = Callable[..., TrainingData]

MAX_PARITY_DIFF = 1e-5
TREES_31_LEAVES = {"objective": "binary", "num_iterations": 100, "num_leaves": 31, "learning_rate": 0.1}


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingData, lightgbm.Booster]:
    path = tmp_path_factory.mktemp("million") / "ai4i.parquet"
    ai4i.write_parquet(ai4i.generate(1_000_000, seed=0), path)
    data = load_training_data(path, feature_columns=list(ai4i.FEATURES), target_column=ai4i.TARGET)
    return data, fit_booster(data, TREES_31_LEAVES)


def test_fixed_export_matches_lightgbm_on_a_million_rows(million: tuple[TrainingData, lightgbm.Booster]) -> None:
    data, booster = million

    assert parity(booster, booster_to_onnx(booster, len(ai4i.FEATURES)), data.features) <= MAX_PARITY_DIFF


def test_stock_conversion_sends_some_of_those_rows_down_other_branches(
    million: tuple[TrainingData, lightgbm.Booster],
) -> None:
    data, booster = million
    stock = convert_stock(booster, len(ai4i.FEATURES)).SerializeToString()

    assert parity(booster, stock, data.features) > 1e-3


def test_every_threshold_is_the_largest_float32_at_or_below_lightgbms(
    million: tuple[TrainingData, lightgbm.Booster],
) -> None:
    _, booster = million
    model = onnx.load_from_string(booster_to_onnx(booster, len(ai4i.FEATURES)))
    # Rounding down is monotonic, so sorted thresholds pair with sorted written values.
    written = np.sort(np.array(_ensemble_split_values(model), dtype=np.float32))
    doubles = np.sort(_split_thresholds(booster.dump_model()))

    assert written.size == doubles.size
    assert np.all(written.astype(np.float64) <= doubles)
    assert np.all(np.nextafter(written, np.float32(np.inf)).astype(np.float64) > doubles)
    assert np.any(doubles.astype(np.float32) != written), "no threshold needed rounding down"


def test_model_takes_input_rows_and_returns_a_label_and_probabilities_per_row(ai4i_data: AI4IData) -> None:
    data = ai4i_data(5000)
    booster = fit_booster(data, {"objective": "binary", "num_iterations": 20})
    model_bytes = booster_to_onnx(booster, len(ai4i.FEATURES))
    session = onnx_session(model_bytes)

    label, probabilities = session.run(["label", "probabilities"], {"input": data.features[:7]})

    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [("input", "tensor(float)", [None, 6])]
    assert label.dtype == np.int64
    assert label.shape == (7,)
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (7, 2)
    assert np.array_equal(label, probabilities.argmax(axis=1))
    assert onnx.load_from_string(model_bytes).producer_name == "kiln"


def test_multiclass_export_is_exact(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("multiclass") / "ai4i.parquet"
    ai4i.write_parquet(ai4i.generate(50_000, seed=1), path)
    data = load_training_data(path, feature_columns=list(ai4i.FEATURES), target_column="failure_type")
    booster = fit_booster(data, {"objective": "multiclass", "num_iterations": 30})

    model_bytes = booster_to_onnx(booster, len(ai4i.FEATURES))

    served = onnx_session(model_bytes).run(["probabilities"], {"input": data.features[:3]})[0]
    assert served.shape == (3, len(data.classes)) == (3, 6)
    assert parity(booster, model_bytes, data.features) <= MAX_PARITY_DIFF


def test_missing_values_take_the_branches_lightgbm_takes() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5000, 3)).astype(np.float32)
    features[rng.random(5000) < 0.1, 0] = np.nan
    labels = (np.nan_to_num(features[:, 0], nan=1.0) + features[:, 1] > 0).astype(np.int64)
    booster = fit_booster(TrainingData(features, labels, [0, 1], ["a", "b", "c"]), {"objective": "binary"})
    probe = rng.normal(size=(300, 3)).astype(np.float32)
    probe[:100] = np.nan  # every feature, including those that never saw a missing value in training
    probe[100:200, 1:] = np.nan
    probe[200:, 0] = np.inf

    assert parity(booster, booster_to_onnx(booster, 3), probe) <= MAX_PARITY_DIFF


def test_categorical_splits_are_refused() -> None:
    rng = np.random.default_rng(0)
    features = np.column_stack([rng.integers(0, 6, 3000), rng.normal(size=3000)]).astype(np.float32)
    labels = np.isin(features[:, 0], [1, 3]).astype(np.int64)
    dataset = lightgbm.Dataset(features, label=labels, categorical_feature=[0])
    booster = lightgbm.train({"objective": "binary", "verbosity": -1, "num_iterations": 5}, dataset)

    with pytest.raises(InvalidInput, match="categorical"):
        booster_to_onnx(booster, 2)


def test_a_regression_booster_is_refused(ai4i_data: AI4IData) -> None:
    booster = fit_booster(ai4i_data(2000), {"objective": "regression", "num_iterations": 5})

    with pytest.raises(InvalidInput, match="'regression'"):
        booster_to_onnx(booster, len(ai4i.FEATURES))


def test_thresholds_are_not_rewritten_onto_trees_they_do_not_belong_to(ai4i_data: AI4IData) -> None:
    data = ai4i_data(5000)
    converted = fit_booster(data, {"objective": "binary", "num_iterations": 10})
    other = fit_booster(data, {"objective": "binary", "num_iterations": 10, "feature_fraction": 0.5, "seed": 3})
    ensemble = _ensemble(convert_stock(converted, len(ai4i.FEATURES)))

    with pytest.raises(ExportMismatch, match="ONNX tree 0"):
        floor_thresholds(ensemble, other.dump_model())


def test_probabilities_have_one_column_per_class_for_binary_models(ai4i_data: AI4IData) -> None:
    data = ai4i_data(2000)
    booster = fit_booster(data, {"objective": "binary", "num_iterations": 5})

    probabilities = predict_proba(booster, data.features)

    assert probabilities.shape == (2000, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(probabilities[:, 1], booster.predict(data.features))


def _ensemble(model: onnx.ModelProto) -> onnx.NodeProto:
    ensembles: list[onnx.NodeProto] = [node for node in model.graph.node if node.op_type == "TreeEnsembleClassifier"]
    (ensemble,) = ensembles
    return ensemble


def _ensemble_split_values(model: onnx.ModelProto) -> list[float]:
    attributes = {attribute.name: attribute for attribute in _ensemble(model).attribute}
    modes = attributes["nodes_modes"].strings
    return [value for value, mode in zip(attributes["nodes_values"].floats, modes, strict=True) if mode != b"LEAF"]


def _split_thresholds(dump: dict[str, Any]) -> np.ndarray:
    thresholds = []
    pending = [tree["tree_structure"] for tree in dump["tree_info"]]
    while pending:
        node = pending.pop()
        if "threshold" in node:
            thresholds.append(node["threshold"])
            pending += [node["left_child"], node["right_child"]]
    return np.array(thresholds, dtype=np.float64)
