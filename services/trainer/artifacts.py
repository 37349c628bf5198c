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

CLASSES_KEY = b"kiln.classes"
# Held-out rows are stored by position: columns named by index, the label last, the feature names in the schema's
# metadata. Feature names are the client's, so no column name of ours can be kept apart from them.
FEATURES_KEY = b"kiln.features"
LABEL_COLUMN = "label"
# Files written before FEATURES_KEY existed name their columns by feature, the label under this name.
EARLIER_LABEL_COLUMN = "__label__"


def save_holdout(holdout: TrainingData, path: Path) -> None:
    columns = {f"feature_{i}": holdout.features[:, i] for i in range(len(holdout.feature_columns))}
    table = pa.table({**columns, LABEL_COLUMN: holdout.labels})
    metadata = {CLASSES_KEY: orjson.dumps(holdout.classes), FEATURES_KEY: orjson.dumps(holdout.feature_columns)}
    pq.write_table(table.replace_schema_metadata(metadata), path)


def load_holdout(path: Path) -> TrainingData:
    table = pq.read_table(path)
    metadata = table.schema.metadata
    if FEATURES_KEY in metadata:
        names = orjson.loads(metadata[FEATURES_KEY])
        features = table.drop_columns([LABEL_COLUMN])
        labels = table.column(LABEL_COLUMN)
    else:
        names = [name for name in table.column_names if name != EARLIER_LABEL_COLUMN]
        features = table.drop_columns([EARLIER_LABEL_COLUMN])
        labels = table.column(EARLIER_LABEL_COLUMN)
    matrix = np.column_stack([column.to_numpy() for column in features.columns]).astype(np.float32, copy=False)
    return TrainingData(
        features=np.ascontiguousarray(matrix),
        labels=labels.to_numpy(),
        classes=orjson.loads(metadata[CLASSES_KEY]),
        feature_columns=names,
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


def read_native_model(store: ObjectStore, prefix: str) -> bytes | None:
    key = prefix + NATIVE_MODEL_FILE
    return store.get_bytes(key) if store.exists(key) else None


def remove_version(prefix: str, *stores: ObjectStore) -> None:
    for store in stores:
        for key in store.list(prefix):
            store.delete(key)
