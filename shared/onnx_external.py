"""ONNX external data: a tensor may keep its values in a file named by the model (`location`, `offset`, `length`).
onnxruntime reads such a file from the folder of the model, or, for a model given as bytes as Kiln gives it, from
the process's working directory: a model a script wrote could have the worker or a predictor read a file there
(the embedded stack's .kiln/secret_key) into a tensor, and its values out through an error or a prediction. Kiln's
models are self-contained, so one that names any such file is refused before onnxruntime opens it."""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]


def external_data_of(model: bytes) -> list[str]:
    """The files the model's tensors name for their values, sorted; empty for a self-contained model, and for bytes
    that are no ONNX model at all (onnxruntime refuses those itself, with its own words)."""
    try:
        parsed = onnx.load_model_from_string(model)
    except (DecodeError, ValueError):
        return []
    graphs = [parsed.graph, *(_function_graph(function) for function in parsed.functions)]
    locations: set[str] = set()
    for tensor in (tensor for graph in graphs for tensor in _tensors(graph)):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            named = [entry.value for entry in tensor.external_data if entry.key == "location"]
            locations.update(named or ["(no location)"])
    return sorted(locations)


def keeps_data_outside(locations: list[str]) -> str:
    """What to say of a model whose tensors name these files."""
    shown = ", ".join(repr(location[:200]) for location in locations[:5])
    return f"keeps tensor data in files outside it ({shown}{', ...' if len(locations) > 5 else ''})"


def _function_graph(function: onnx.FunctionProto) -> onnx.GraphProto:
    return onnx.helper.make_graph(list(function.node), function.name, [], [])


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the graph: initializers, sparse ones, and those in node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            for sparse in attribute.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)
