"""Fixtures shared by the unit tests: AI4I data taken through the same Parquet path a training run uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.local import ai4i
from services.trainer.pipeline.data import TrainingData, load_training_data


@pytest.fixture
def ai4i_data(tmp_path: Path) -> Callable[..., TrainingData]:
    """Build TrainingData from `ai4i.generate(n_rows, seed=seed)` written to, and read back from, Parquet."""

    def build(n_rows: int, *, seed: int = 0) -> TrainingData:
        path = tmp_path / f"ai4i-{n_rows}-{seed}.parquet"
        ai4i.write_parquet(ai4i.generate(n_rows, seed=seed), path)
        return load_training_data(path, feature_columns=list(ai4i.FEATURES), target_column=ai4i.TARGET)

    return build
