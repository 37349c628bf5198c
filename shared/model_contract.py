"""What every reader of a stored model.onnx expects of its signature: one input INPUT_NAME of [rows, features]
and an output PROBABILITIES_OUTPUT (beside LABEL_OUTPUT, which the predictor's V2 protocol offers too). The trainer
judges a model by it before a version can pass its gates, and the predictor refuses a model breaking it: so a
version that passed is one every predictor loads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

INPUT_NAME = "input"
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"


class Tensor(Protocol):
    """An input or output as onnxruntime describes it (onnxruntime.NodeArg)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[object]: ...


def signature_problem(inputs: Sequence[Tensor], outputs: Sequence[Tensor], n_features: int) -> str | None:
    """What is wrong with a model's inputs and outputs for `n_features` features, or None. A width given by name
    (a symbolic dimension) is refused as a wrong one: nothing says the model takes this many."""
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or list(inputs[0].shape)[-1:] != [n_features]:
        found = [(tensor.name, list(tensor.shape)) for tensor in inputs]
        return f"expected one input {INPUT_NAME!r} with {n_features} features, found {found}"
    names = sorted(tensor.name for tensor in outputs)
    if PROBABILITIES_OUTPUT not in names:
        return f"no {PROBABILITIES_OUTPUT!r} output in {names}"
    return None
