"""The built-in training script, run as the worker runs it (through the sandbox) and as an operator would
(`python train_lightgbm.py CONFIG.json`): it leaves a model that decides as LightGBM does, and reports progress."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import services.trainer.scripts
from deploy.local import ai4i
from services.trainer.pipeline.data import TrainingData
from services.trainer.pipeline.validate import parity
from services.trainer.sandbox import Limits, Sandbox

SCRIPT = Path(services.trainer.scripts.__file__).parent / "train_lightgbm.py"
LIMITS = Limits(timeout_s=300, cpu_s=600, memory_mb=8192, max_file_mb=512, max_open_files=256, disk_mb=4096)
ROWS = 20_000
MAX_PARITY_DIFF = 1e-5


@dataclass(frozen=True)
class Trained:
    data: TrainingData
    outputs: Path
    lines: list[str]

    def booster(self) -> lightgbm.Booster:
        return lightgbm.Booster(model_file=self.outputs / "model.txt")

    def metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = json.loads((self.outputs / "metrics.json").read_text())
        return metrics

    def progress(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


@pytest.fixture
def train_in_sandbox(
    sandbox: Sandbox, ai4i_data: Callable[..., TrainingData], tmp_path: Path
) -> Callable[[dict[str, Any]], Trained]:
    """Train on AI4I rows with these hyperparameters, as a run does: files and config in a workspace."""

    def train(hyperparameters: dict[str, Any]) -> Trained:
        data = ai4i_data(ROWS)
        lines: list[str] = []
        with sandbox.workspace() as workdir:
            # Inside the workspace, the one folder a confined script may write in; kept once it is removed.
            config = write_run_files(workdir, data, hyperparameters, workdir / "outputs")
            result = sandbox.run(SCRIPT, config, workdir, LIMITS, should_stop=lambda: False, on_output=lines.append)
            assert result.ok, result.reason()
            outputs = Path(shutil.copytree(workdir / "outputs", tmp_path / "outputs"))
        return Trained(data, outputs, lines)

    return train


def write_run_files(folder: Path, data: TrainingData, hyperparameters: dict[str, Any], outputs: Path) -> Path:
    """The train file and config as the worker writes them: float32 features, class indices as the target."""
    train_file = folder / "train.parquet"
    columns = {name: data.features[:, index] for index, name in enumerate(data.feature_columns)}
    pq.write_table(pa.table({**columns, ai4i.TARGET: data.labels}), train_file)
    config = {
        "organizationId": "org-test",
        "runId": "run-test",
        "featureColumns": data.feature_columns,
        "targetColumn": ai4i.TARGET,
        "classes": data.classes,
        "hyperparameters": hyperparameters,
        "data": {"train": str(train_file)},
        "outputPath": str(outputs),
    }
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(config))
    return config_file


def test_it_leaves_a_model_that_decides_as_lightgbm_does(train_in_sandbox: Callable[..., Trained]) -> None:
    trained = train_in_sandbox({"numIterations": 100})
    model = (trained.outputs / "model.onnx").read_bytes()

    assert parity(trained.booster(), model, trained.data.features) <= MAX_PARITY_DIFF
    assert trained.metrics() == {
        "rows": ROWS,
        "earlyStoppingRows": 0,
        "features": len(ai4i.FEATURES),
        "trees": 100,
        "best_iteration": 100,
        "fit_seconds": trained.metrics()["fit_seconds"],
        "export_seconds": trained.metrics()["export_seconds"],
    }


def test_it_reports_progress_about_every_twentieth_round(train_in_sandbox: Callable[..., Trained]) -> None:
    progress = train_in_sandbox({"numIterations": 100}).progress()

    training = [event for event in progress if event["stage"] == "training"]
    assert [event["iteration"] for event in training] == list(range(5, 101, 5))
    assert {event["of"] for event in training} == {100}
    assert progress[len(training) :] == [{"stage": "exporting"}, {"stage": "done"}]


def test_early_stopping_keeps_the_best_rounds_in_both_models(train_in_sandbox: Callable[..., Trained]) -> None:
    trained = train_in_sandbox({"numIterations": 1000, "learningRate": 0.5, "earlyStoppingRounds": 5})
    model = (trained.outputs / "model.onnx").read_bytes()
    booster = trained.booster()

    assert trained.metrics()["best_iteration"] < 1000
    assert (trained.metrics()["rows"], trained.metrics()["earlyStoppingRows"]) == (ROWS * 9 // 10, ROWS // 10)
    assert booster.num_trees() == trained.metrics()["trees"] == trained.metrics()["best_iteration"]
    assert parity(booster, model, trained.data.features) <= MAX_PARITY_DIFF


def test_it_runs_as_a_plain_python_script(ai4i_data: Callable[..., TrainingData], tmp_path: Path) -> None:
    config = write_run_files(tmp_path, ai4i_data(2_000), {"numIterations": 10}, tmp_path / "outputs")

    finished = subprocess.run(
        [sys.executable, str(SCRIPT), str(config)], env={}, cwd=tmp_path, capture_output=True, check=False
    )

    assert finished.returncode == 0, finished.stderr.decode()
    assert json.loads(finished.stdout.splitlines()[-1]) == {"stage": "done"}
    assert sorted(path.name for path in (tmp_path / "outputs").iterdir()) == ["metrics.json", "model.onnx", "model.txt"]
