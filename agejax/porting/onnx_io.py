"""Reading ONNX graphs as plain nodes and numpy initializers, with the `onnx` package (protobuf: no code runs).

`read_onnx` returns an `OnnxGraph`: the nodes in file order (which ONNX requires to be topological), their
attributes as Python values, the initializers as numpy arrays, and the graph's inputs and outputs, plus the
lookups a converter needs to walk the graph by data flow (`consumers`, `producer`, `const`). External
tensor data is refused (it would mean reading other files the graph names); so is a file protobuf cannot
parse (truncated, or not ONNX), with an error naming the file.
"""

import dataclasses
import os
from typing import Any

import numpy as np

from agejax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class OnnxNode:
  op_type: str
  name: str
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  attrs: dict[str, Any]
  domain: str = ""


@dataclasses.dataclass
class OnnxGraph:
  """A parsed ONNX graph; `path` is the file it came from (used in every error message)."""

  path: str
  nodes: list[OnnxNode]
  initializers: dict[str, np.ndarray]
  inputs: list[tuple[str, tuple[int | str | None, ...]]]  # graph inputs that are not initializers
  outputs: list[str]
  opset: int

  def __post_init__(self):
    self._consumers: dict[str, list[OnnxNode]] = {}
    self._producer: dict[str, OnnxNode] = {}
    for node in self.nodes:
      for t in node.inputs:
        if t:
          self._consumers.setdefault(t, []).append(node)
      for t in node.outputs:
        self._producer[t] = node

  def consumers(self, tensor: str) -> list[OnnxNode]:
    return list(self._consumers.get(tensor, []))

  def producer(self, tensor: str) -> OnnxNode | None:
    return self._producer.get(tensor)

  def const(self, tensor: str) -> np.ndarray | None:
    """The initializer (or Constant node value) named `tensor`, else None."""
    if tensor in self.initializers:
      return self.initializers[tensor]
    node = self._producer.get(tensor)
    if node is not None and node.op_type == "Constant" and "value" in node.attrs:
      return node.attrs["value"]
    return None

  def error(self, node: OnnxNode | str, what: str) -> CheckpointError:
    name = node if isinstance(node, str) else f"{node.name or '(unnamed)'} ({node.op_type})"
    return CheckpointError(f"{self.path}: node {name}: {what}")


def _import_onnx() -> Any:
  try:
    import onnx
  except ImportError as e:
    raise CheckpointError("reading ONNX files needs the onnx package: pip install -r requirements-port.txt") from e
  return onnx


def _attr_value(onnx: Any, attr: Any, path: str, node_name: str) -> Any:
  value = onnx.helper.get_attribute_value(attr)
  if isinstance(value, bytes):
    return value.decode("utf8")
  if isinstance(value, list):
    return tuple(v.decode("utf8") if isinstance(v, bytes) else v for v in value)
  if hasattr(value, "dims") and hasattr(value, "data_type"):  # a TensorProto (Constant's 'value')
    return onnx.numpy_helper.to_array(value)
  if hasattr(value, "node"):  # a subgraph (If, Loop, Scan): never needed by the supported architectures
    raise CheckpointError(f"{path}: node {node_name}: attribute {attr.name!r} holds a subgraph; control flow "
                          "is not supported")
  return value


def read_onnx(path: str) -> OnnxGraph:
  """Parses an ONNX file (see the module docstring); raises CheckpointError naming the file and tensor/node."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such ONNX file")
  onnx = _import_onnx()
  from google.protobuf.message import DecodeError

  try:
    model = onnx.load(path, load_external_data=False)
  except (DecodeError, ValueError, OSError, RuntimeError) as e:
    raise CheckpointError(f"{path}: not a readable ONNX model (truncated or another format?): "
                          f"{type(e).__name__}: {e}") from e
  g = model.graph
  if not g.node:
    raise CheckpointError(f"{path}: not a readable ONNX model (no graph nodes; truncated or another format?)")
  opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
  initializers = {}
  for t in g.initializer:
    if t.data_location == onnx.TensorProto.EXTERNAL:
      raise CheckpointError(f"{path}: initializer {t.name!r} keeps its data in an external file; only "
                            "self-contained ONNX files are read")
    try:
      initializers[t.name] = np.asarray(onnx.numpy_helper.to_array(t))
    except (ValueError, TypeError) as e:
      raise CheckpointError(f"{path}: initializer {t.name!r} (dims {list(t.dims)}) cannot be read "
                            f"(truncated or altered?): {e}") from e
  nodes = []
  for n in g.node:
    attrs = {a.name: _attr_value(onnx, a, path, n.name) for a in n.attribute}
    nodes.append(OnnxNode(n.op_type, n.name, tuple(n.input), tuple(n.output), attrs, n.domain))
  inputs = []
  for i in g.input:
    if i.name in initializers:
      continue
    dims = tuple((d.dim_value if d.HasField("dim_value") else d.dim_param or None)
                 for d in i.type.tensor_type.shape.dim)
    inputs.append((i.name, dims))
  return OnnxGraph(path, nodes, initializers, inputs, [o.name for o in g.output], opset)
