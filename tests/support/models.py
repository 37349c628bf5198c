"""Tiny real models for tests: LightGBM trained in-process on AI4I-rule rows and exported to ONNX."""

from __future__ import annotations

import functools
from pathlib import Path
from tempfile import TemporaryDirectory

import lightgbm
import onnx
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from deploy.local import ai4i
from services.trainer.artifacts import save_holdout
from services.trainer.native_scores import NativeScores
from services.trainer.pipeline.data import TrainingData, load_training_data
from services.trainer.pipeline.export import booster_to_onnx
from services.trainer.pipeline.train import fit_booster, predict_proba
from services.trainer.pipeline.validate import Gates
from services.trainer.validation import judge
from shared.db.models import ModelVersion
from shared.layout import HOLDOUT_FILE, NATIVE_MODEL_FILE, model_key, model_prefix
from shared.storage import ObjectStore
from tests.support.seed import seed_version

FEATURES = list(ai4i.FEATURES)


@functools.cache
def tiny_model(seed: int = 0, trees: int = 10, n_features: int = len(FEATURES)) -> bytes:
    """ONNX bytes of a small model on 2,000 AI4I rows and the first n_features features; cached, so each is trained
    once per session."""
    features = FEATURES[:n_features]
    with TemporaryDirectory() as folder:
        path = Path(folder) / "ai4i.parquet"
        ai4i.write_parquet(ai4i.generate(2_000, seed=seed), path)
        data = load_training_data(path, feature_columns=features, target_column=ai4i.TARGET)
    booster = fit_booster(data, {"objective": "binary", "num_iterations": trees, "num_leaves": 7, "verbosity": -1})
    return booster_to_onnx(booster, len(features))


@functools.cache
def tiny_multiclass_model(trees: int = 10) -> tuple[bytes, list[str]]:
    """ONNX bytes and classes of a small model of the failure types ("none", "HDF", "PWF" ...) on 5,000 AI4I rows,
    every feature; cached."""
    with TemporaryDirectory() as folder:
        path = Path(folder) / "ai4i.parquet"
        ai4i.write_parquet(ai4i.generate(5_000, seed=0), path)
        data = load_training_data(path, feature_columns=FEATURES, target_column="failure_type")
    params = {"objective": "multiclass", "num_iterations": trees, "num_leaves": 7, "verbosity": -1}
    return booster_to_onnx(fit_booster(data, params), len(FEATURES)), [str(label) for label in data.classes]


def model_reading_a_file(location: str = "secret_key") -> bytes:
    """A tiny model given one more initializer whose values ONNX external data keeps in the file `location`, which
    onnxruntime would read from its process's working directory."""
    model = onnx.load_model_from_string(tiny_model(seed=4))
    outside = onnx.TensorProto(name="outside", data_type=onnx.TensorProto.UINT8, dims=[7])
    outside.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "7")):
        outside.external_data.add(key=key, value=value)
    model.graph.initializer.append(outside)
    return bytes(model.SerializeToString())


def register_model(engine: Engine, store: ObjectStore, org_id: str, model: bytes, **kwargs: object) -> str:
    """A validated version whose model.onnx is in the store, as a finished training run leaves it."""
    version = seed_version(engine, org_id, model=model, **{"feature_columns": FEATURES, **kwargs})  # type: ignore[arg-type]
    store.put_bytes(model_key(org_id, version), model)
    return version


@functools.cache
def _judgeable() -> tuple[lightgbm.Booster, bytes, TrainingData]:
    """A tiny booster, its ONNX and held-out rows to judge it on: accuracy 0.96, precision 0.75, recall 0.21 (so
    the default gates reject it for recall alone)."""
    with TemporaryDirectory() as folder:
        for name, rows, seed in (("train", 2_000, 0), ("holdout", 1_000, 1)):
            ai4i.write_parquet(ai4i.generate(rows, seed=seed), Path(folder) / name)
        data = load_training_data(Path(folder) / "train", feature_columns=FEATURES, target_column=ai4i.TARGET)
        holdout = load_training_data(Path(folder) / "holdout", feature_columns=FEATURES, target_column=ai4i.TARGET)
    booster = fit_booster(data, {"objective": "binary", "num_iterations": 10, "num_leaves": 7, "verbosity": -1})
    return booster, booster_to_onnx(booster, len(FEATURES)), holdout


def register_judgeable(engine: Engine, store: ObjectStore, org_id: str, gates: dict[str, float]) -> str:
    """A version as a finished run leaves it, judged under `gates` (validated or rejected, with that report), with
    everything a later judgement reads in the store: model.onnx, model.txt and the held-out rows."""
    booster, model, holdout = _judgeable()
    native = NativeScores(predict_proba(booster, holdout.features))
    verdict = judge(model, native, holdout, Gates().with_overrides(gates))
    version = register_model(engine, store, org_id, model, passed=verdict.passed)
    prefix = model_prefix(org_id, version)
    store.put_bytes(prefix + NATIVE_MODEL_FILE, booster.model_to_string().encode())
    with TemporaryDirectory() as folder:
        save_holdout(holdout, Path(folder) / HOLDOUT_FILE)
        store.put_file(prefix + HOLDOUT_FILE, Path(folder) / HOLDOUT_FILE)
    with Session(engine) as session, session.begin():
        session.execute(update(ModelVersion).where(ModelVersion.version == version).values(validation=verdict.report))
    return version


def ai4i_row(index: int = 0) -> dict[str, float]:
    table = ai4i.generate(index + 1, seed=99).slice(index, 1)
    return {name: float(table.column(name)[0].as_py()) for name in FEATURES}


def nan_model(n_features: int = len(FEATURES)) -> bytes:
    """A well-formed ONNX model with Kiln's signature whose probabilities are NaN: it loads, and fails warm-up."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "nan"], ["not_a_number"]),
        helper.make_node("Concat", ["not_a_number", "not_a_number"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_features])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
        ],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())
