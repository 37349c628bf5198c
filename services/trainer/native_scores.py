"""The parity gate's other side: the LightGBM model a script made, run on the held-out rows in the sandbox
(scripts/score_native.py says why never in the worker)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

import services.trainer.scripts
from services.trainer.sandbox import Limits, Sandbox

SCORE_NATIVE_SCRIPT = Path(services.trainer.scripts.__file__).parent / "score_native.py"


@dataclass(frozen=True)
class NativeScores:
    """The booster's probabilities on every held-out row, or why there are none (`problem`, a phrase that follows
    "the stored model.txt")."""

    probabilities: np.ndarray | None
    problem: str | None = None


def score_natively(
    sandbox: Sandbox,
    native_model: bytes,
    features: np.ndarray,
    n_classes: int,
    limits: Limits,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> NativeScores:
    """Run `native_model` (model.txt's bytes) on `features` in a workspace of its own. A model that does not load,
    does not fit the rows or crashes LightGBM gives a problem, not an exception; so does one stopped by
    `should_stop`, which the caller then acts on."""
    with sandbox.workspace() as workdir:
        model_file, features_file, output = workdir / "model.txt", workdir / "features.npy", workdir / "scores.npy"
        model_file.write_bytes(native_model)
        np.save(features_file, features, allow_pickle=False)
        config = workdir / "config.json"
        config.write_bytes(
            orjson.dumps({"model": str(model_file), "features": str(features_file), "output": str(output)})
        )
        result = sandbox.run(
            SCORE_NATIVE_SCRIPT, config, workdir, limits, should_stop=should_stop, on_output=lambda _: None
        )
        if not result.ok:
            return NativeScores(None, f"does not run in LightGBM: {result.reason()}")
        probabilities = np.load(output, allow_pickle=False)
    expected = (features.shape[0], n_classes)
    if probabilities.shape != expected:
        shape = " x ".join(map(str, probabilities.shape))
        return NativeScores(None, f"gives {shape} probabilities for {expected[0]} rows of {n_classes} classes")
    return NativeScores(probabilities)
