"""A version's files in the object store, and the held-out rows kept beside them so the version can be judged
again later exactly as it was judged when trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from services.trainer.pipeline.data import TrainingData
from shared.layout import (
    HOLDOUT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    NATIVE_MODEL_FILE,
    TRAINING_CONFIG_FILE,
    VALIDATION_FILE,
)
from shared.storage import ObjectStore, get_verified_bytes

LABEL_COLUMN = "__label__"
CLASSES_KEY = b"kiln.classes"


def save_holdout(holdout: TrainingData, path: Path) -> None:
    columns = {name: holdout.features[:, i] for i, name in enumerate(holdout.feature_columns)}
    table = pa.table({**columns, LABEL_COLUMN: holdout.labels})
    pq.write_table(table.replace_schema_metadata({CLASSES_KEY: orjson.dumps(holdout.classes)}), path)


def load_holdout(path: Path) -> TrainingData:
    table = pq.read_table(path)
    features = [name for name in table.column_names if name != LABEL_COLUMN]
    matrix = np.column_stack([table.column(name).to_numpy() for name in features]).astype(np.float32, copy=False)
    return TrainingData(
        features=np.ascontiguousarray(matrix),
        labels=table.column(LABEL_COLUMN).to_numpy(),
        classes=orjson.loads(table.schema.metadata[CLASSES_KEY]),
        feature_columns=features,
    )


def upload_candidate(
    store: ObjectStore, prefix: str, *, outputs: Path, holdout: Path, holdout_store: ObjectStore, with_model: bool
) -> None:
    """The files judged from the store: the model (unless over the size gate), its native twin, and the held-out
    rows, which go to `holdout_store`: the central store, or the worker's own for an org whose data stays home."""
    if with_model:
        store.put_file(prefix + MODEL_FILE, outputs / MODEL_FILE)
    native = outputs / NATIVE_MODEL_FILE
    if native.exists():
        store.put_file(prefix + NATIVE_MODEL_FILE, native)
    holdout_store.put_file(prefix + HOLDOUT_FILE, holdout)


def upload_reports(
    store: ObjectStore, prefix: str, *, metrics: dict[str, Any], config: dict[str, Any], validation: dict[str, Any]
) -> None:
    for name, content in ((METRICS_FILE, metrics), (TRAINING_CONFIG_FILE, config), (VALIDATION_FILE, validation)):
        store.put_bytes(prefix + name, orjson.dumps(content, option=orjson.OPT_INDENT_2))


def read_model(store: ObjectStore, prefix: str, sha256: str) -> bytes:
    return get_verified_bytes(store, prefix + MODEL_FILE, sha256)


def read_native_model(store: ObjectStore, prefix: str) -> str | None:
    key = prefix + NATIVE_MODEL_FILE
    return store.get_bytes(key).decode() if store.exists(key) else None


def remove_version(prefix: str, *stores: ObjectStore) -> None:
    for store in stores:
        for key in store.list(prefix):
            store.delete(key)
