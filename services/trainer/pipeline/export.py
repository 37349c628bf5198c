"""LightGBM booster to an ONNX model that takes every branch the booster takes.

onnxmltools stores each split threshold as the float32 nearest LightGBM's double. When that float32 lies
above the double, an input equal to it goes left in ONNX and right in LightGBM (on 1M AI4I rows: 226 rows
off, probabilities up to 0.27 apart). For a float32 input x and a double t, x <= t holds exactly when x is at
most the largest float32 not above t, so that is the threshold written here, matched to LightGBM's own
doubles tree by tree and node by node.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightgbm
import numpy as np
import onnx
import onnxmltools
import onnxruntime
from onnxmltools.convert.common.data_types import FloatTensorType

from shared.errors import InvalidInput
from shared.model_contract import INPUT_NAME, LABEL_OUTPUT, PROBABILITIES_OUTPUT

_SUPPORTED_OBJECTIVES = frozenset({"binary", "multiclass"})
_DOC = (
    "LightGBM classifier converted by onnxmltools; split thresholds are the largest float32 at or below "
    "LightGBM's double thresholds, so float32 inputs take the booster's branches."
)

Tree = Mapping[str, Any]


class ExportMismatch(RuntimeError):
    """The converter's trees do not line up with the booster's, so no threshold can be fixed safely."""


def booster_to_onnx(booster: lightgbm.Booster, n_features: int) -> bytes:
    """The serialised ONNX model: float input "input" [N, n_features]; "label" [N], "probabilities" [N, c]."""
    if n_features != booster.num_feature():
        raise ValueError(f"the booster was trained on {booster.num_feature()} features, not {n_features}")
    dump = booster.dump_model()
    _refuse_unsupported(dump)
    model = convert_stock(booster, n_features)
    floor_thresholds(_tree_ensemble(model), dump)
    _declare_batch_label(model)
    model.producer_name = "kiln"
    model.producer_version = ""
    model.doc_string = _DOC
    onnx.helper.set_model_props(model, {"converter": f"onnxmltools {onnxmltools.__version__}"})
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def convert_stock(booster: lightgbm.Booster, n_features: int) -> onnx.ModelProto:
    """onnxmltools' conversion as it comes, thresholds rounded to nearest: the baseline the fix is held to."""
    initial_types = [(INPUT_NAME, FloatTensorType([None, n_features]))]
    model: onnx.ModelProto = onnxmltools.convert_lightgbm(booster, initial_types=initial_types, zipmap=False)
    return model


def floor_thresholds(ensemble: onnx.NodeProto, dump: Mapping[str, Any]) -> None:
    """Rewrite, in place, each split of a TreeEnsembleClassifier from the booster's `dump_model()`.

    Thresholds become the largest float32 at or below LightGBM's double; NaN is routed where LightGBM
    routes it. Every node is checked against the dump first, and any disagreement raises ExportMismatch.
    """
    nodes = _EnsembleNodes(ensemble)
    for tree_id, tree in enumerate(dump["tree_info"]):
        _floor_tree(nodes, tree_id, tree["tree_structure"])
    nodes.write_back()


def onnx_session(model_bytes: bytes) -> onnxruntime.InferenceSession:
    """A CPU session on one thread, run sequentially: the shape a single-row predictor serves with."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def _refuse_unsupported(dump: Mapping[str, Any]) -> None:
    objective = str(dump.get("objective", "")).split(" ", 1)[0]
    if objective not in _SUPPORTED_OBJECTIVES:
        raise InvalidInput(
            f"only binary and multiclass models export to ONNX, not {objective!r}", field="hyperparameters"
        )
    for split in _splits(dump):
        if split["decision_type"] != "<=":
            raise InvalidInput("categorical splits cannot be exported exactly; declare features numeric")
        if split["missing_type"] == "Zero":
            raise InvalidInput("zero_as_missing splits have no exact ONNX form; leave it off")


def _splits(dump: Mapping[str, Any]) -> Iterator[Tree]:
    pending = [tree["tree_structure"] for tree in dump["tree_info"]]
    while pending:
        node = pending.pop()
        if "split_index" in node:
            yield node
            pending += [node["left_child"], node["right_child"]]


def _floor_tree(nodes: _EnsembleNodes, tree_id: int, root: Tree) -> None:
    pending = [(root, nodes.root(tree_id))]
    while pending:
        node, position = pending.pop()
        if "split_index" not in node:
            nodes.expect_leaf(position)
            continue
        nodes.floor_split(position, node)
        pending.append((node["left_child"], nodes.child(position, branch_taken=True)))
        pending.append((node["right_child"], nodes.child(position, branch_taken=False)))


class _EnsembleNodes:
    """The nodes_* attributes of one tree ensemble, addressed by (tree id, node id)."""

    def __init__(self, ensemble: onnx.NodeProto):
        self._attributes = {attribute.name: attribute for attribute in ensemble.attribute}
        self.tree_ids = self._read("nodes_treeids")
        self.node_ids = self._read("nodes_nodeids")
        self.feature_ids = self._read("nodes_featureids")
        self.modes = [mode.decode() for mode in self._read("nodes_modes")]
        self.values = self._read("nodes_values")
        self.true_ids = self._read("nodes_truenodeids")
        self.false_ids = self._read("nodes_falsenodeids")
        self.nan_goes_true = self._read("nodes_missing_value_tracks_true")
        self._position = {key: index for index, key in enumerate(zip(self.tree_ids, self.node_ids, strict=True))}
        self._roots = self._find_roots()
        self._visited: set[int] = set()

    def _read(self, name: str) -> list[Any]:
        if name not in self._attributes:
            raise ExportMismatch(f"the tree ensemble has no {name}")
        return list(onnx.helper.get_attribute_value(self._attributes[name]))

    def _find_roots(self) -> dict[int, list[int]]:
        """Per tree, the nodes no split points to: there must be exactly one."""
        children = {
            (tree, child)
            for tree, mode, true_id, false_id in zip(
                self.tree_ids, self.modes, self.true_ids, self.false_ids, strict=True
            )
            if mode != "LEAF"
            for child in (true_id, false_id)
        }
        roots: dict[int, list[int]] = {}
        for key, position in self._position.items():
            if key not in children:
                roots.setdefault(key[0], []).append(position)
        return roots

    def root(self, tree_id: int) -> int:
        roots = self._roots.get(tree_id, [])
        if len(roots) != 1:
            raise ExportMismatch(f"ONNX tree {tree_id} has {len(roots)} roots")
        return roots[0]

    def child(self, position: int, *, branch_taken: bool) -> int:
        child_id = (self.true_ids if branch_taken else self.false_ids)[position]
        key = (self.tree_ids[position], child_id)
        if key not in self._position:
            raise ExportMismatch(f"ONNX tree {key[0]} points to a missing node {child_id}")
        return self._position[key]

    def expect_leaf(self, position: int) -> None:
        self._visit(position, "LEAF")

    def floor_split(self, position: int, split: Tree) -> None:
        self._visit(position, "BRANCH_LEQ")
        threshold = float(split["threshold"])
        if self.feature_ids[position] != split["split_feature"] or _nearest_float32(threshold) != self.values[position]:
            raise ExportMismatch(
                f"ONNX tree {self.tree_ids[position]} node {self.node_ids[position]} tests feature "
                f"{self.feature_ids[position]} <= {self.values[position]!r}; LightGBM tests feature "
                f"{split['split_feature']} <= {threshold!r}"
            )
        self.values[position] = _float32_at_or_below(threshold)
        # LightGBM reads NaN as 0.0 unless the split learned where missing values go.
        nan_goes_left = split["default_left"] if split["missing_type"] == "NaN" else threshold >= 0.0
        self.nan_goes_true[position] = int(nan_goes_left)

    def _visit(self, position: int, mode: str) -> None:
        if self.modes[position] != mode or position in self._visited:
            raise ExportMismatch(
                f"ONNX tree {self.tree_ids[position]} node {self.node_ids[position]} is {self.modes[position]}"
                f"{' (reached twice)' if position in self._visited else ''} where LightGBM has {mode}"
            )
        self._visited.add(position)

    def write_back(self) -> None:
        unmatched = len(self.tree_ids) - len(self._visited)
        if unmatched:
            raise ExportMismatch(f"the ONNX ensemble has {unmatched} nodes that LightGBM's trees lack")
        values = self._attributes["nodes_values"].floats
        del values[:]
        values.extend(self.values)
        nan_routes = self._attributes["nodes_missing_value_tracks_true"].ints
        del nan_routes[:]
        nan_routes.extend(self.nan_goes_true)


def _nearest_float32(value: float) -> np.float32:
    # LightGBM writes "every number goes one way" as a +-1e300 threshold, which as a float32 is +-inf,
    # the same value the converter stores.
    with np.errstate(over="ignore"):
        return np.float32(value)


def _float32_at_or_below(value: float) -> float:
    nearest = _nearest_float32(value)
    if float(nearest) > value:
        nearest = np.nextafter(nearest, np.float32(-np.inf))
    return float(nearest)


def _tree_ensemble(model: onnx.ModelProto) -> onnx.NodeProto:
    ensembles = [node for node in model.graph.node if node.op_type == "TreeEnsembleClassifier"]
    if len(ensembles) != 1:
        raise ExportMismatch(f"expected one TreeEnsembleClassifier, the converter made {len(ensembles)}")
    ensemble: onnx.NodeProto = ensembles[0]
    return ensemble


def _declare_batch_label(model: onnx.ModelProto) -> None:
    """onnxmltools declares the label output as [1]; it is one label per input row."""
    outputs = {output.name: output for output in model.graph.output}
    if outputs.keys() != {LABEL_OUTPUT, PROBABILITIES_OUTPUT}:
        raise ExportMismatch(f"expected outputs {LABEL_OUTPUT!r} and {PROBABILITIES_OUTPUT!r}, got {sorted(outputs)}")
    label = outputs[LABEL_OUTPUT]
    label.CopyFrom(onnx.helper.make_tensor_value_info(LABEL_OUTPUT, label.type.tensor_type.elem_type, [None]))
