"""Which files an ONNX model's tensors name for their values (external data), wherever in the model they are."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from shared.onnx_external import external_data_of
from tests.support.models import model_reading_a_file, tiny_model


def outside(location: str) -> TensorProto:
    tensor = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[7])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def test_a_self_contained_model_names_no_file() -> None:
    assert external_data_of(tiny_model()) == []


def test_an_initializer_s_file_is_named() -> None:
    assert external_data_of(model_reading_a_file(".kiln/secret_key")) == [".kiln/secret_key"]


def test_a_file_named_inside_a_subgraph_or_a_constant_is_named_too() -> None:
    branch_output = helper.make_tensor_value_info("z", TensorProto.UINT8, [7])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["z"])], "branch", [], [branch_output], initializer=[outside("a")]
    )
    condition = numpy_helper.from_array(np.array(True), "c")
    nodes = [
        helper.make_node("If", ["c"], ["o"], then_branch=branch, else_branch=branch),
        helper.make_node("Constant", [], ["k"], value=outside("b")),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.UINT8, [7]) for name in ("o", "k")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs, initializer=[condition]))

    assert external_data_of(model.SerializeToString()) == ["a", "b"]


def test_bytes_that_are_no_model_are_left_to_onnxruntime() -> None:
    assert external_data_of(b"\x08\x07 not a model") == []
