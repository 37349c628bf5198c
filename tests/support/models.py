"""Tiny real models for tests: LightGBM trained in-process on AI4I-rule rows and exported to ONNX."""

from __future__ import annotations

import functools
from pathlib import Path
from tempfile import TemporaryDirectory

from sqlalchemy import Engine

from deploy.local import ai4i
from services.trainer.pipeline.data import load_training_data
from services.trainer.pipeline.export import booster_to_onnx
from services.trainer.pipeline.train import fit_booster
from shared.layout import model_key
from shared.storage import ObjectStore
from tests.support.seed import seed_version

FEATURES = list(ai4i.FEATURES)


@functools.cache
def tiny_model(seed: int = 0, trees: int = 10) -> bytes:
    """ONNX bytes of a 10-tree model on 2,000 AI4I rows; cached per seed, so each is trained once per session."""
    with TemporaryDirectory() as folder:
        path = Path(folder) / "ai4i.parquet"
        ai4i.write_parquet(ai4i.generate(2_000, seed=seed), path)
        data = load_training_data(path, feature_columns=FEATURES, target_column=ai4i.TARGET)
    booster = fit_booster(data, {"objective": "binary", "num_iterations": trees, "num_leaves": 7, "verbosity": -1})
    return booster_to_onnx(booster, len(FEATURES))


def register_model(engine: Engine, store: ObjectStore, org_id: str, model: bytes, **kwargs: object) -> str:
    """A validated version whose model.onnx is in the store, as a finished training run leaves it."""
    version = seed_version(engine, org_id, model=model, feature_columns=FEATURES, **kwargs)  # type: ignore[arg-type]
    store.put_bytes(model_key(org_id, version), model)
    return version


def ai4i_row(index: int = 0) -> dict[str, float]:
    table = ai4i.generate(index + 1, seed=99).slice(index, 1)
    return {name: float(table.column(name)[0].as_py()) for name in FEATURES}
