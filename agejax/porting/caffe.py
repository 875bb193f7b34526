"""Reading and writing Caffe `.caffemodel` weights (protobuf NetParameter, new and V1 layouts)."""

import dataclasses
import os
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from agejax.errors import CheckpointError
from agejax.porting.caffe_proto import RAW, TYPED, V1_LAYER_TYPES

V1_TYPE_CODES = {v: k for k, v in V1_LAYER_TYPES.items()}


@dataclasses.dataclass
class CaffeLayer:
  """One layer with weights: its name, type ('Convolution', 'InnerProduct', ...) and blobs."""

  name: str
  type: str
  blobs: list[np.ndarray]


class _Unpacked(Exception):
  """Blob data not stored packed; the typed description must read the file."""


def _blob_shape(blob: Any) -> tuple[int, ...]:
  if blob.HasField("shape"):
    return tuple(int(d) for d in blob.shape.dim)
  return (blob.num, blob.channels, blob.height, blob.width)  # legacy 4-D blobs


def _blob_values(blob: Any, raw: bool) -> np.ndarray:
  if raw:
    chunks, dtype = (blob.data, "<f4") if len(blob.data) else (blob.double_data, "<f8")
    return np.frombuffer(chunks[0] if len(chunks) == 1 else b"".join(chunks), dtype=dtype)
  values = blob.data if len(blob.data) else blob.double_data
  return np.fromiter(values, dtype=np.float64 if not len(blob.data) else np.float32, count=len(values))


def _blob_array(blob: Any, raw: bool, where: str) -> np.ndarray:
  shape = _blob_shape(blob)
  size = int(np.prod(shape)) if shape else 1
  values = _blob_values(blob, raw)
  if values.size != size:
    if raw:
      raise _Unpacked
    raise CheckpointError(f"{where}: blob shape {shape} needs {size} values, the file has {values.size}")
  return values.astype(np.float32, copy=False).reshape(shape)


def _parse(path: str, data: bytes, raw: bool) -> list[CaffeLayer]:
  net = (RAW if raw else TYPED)["NetParameter"]()
  try:
    net.ParseFromString(data)
  except (DecodeError, RuntimeError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable .caffemodel (truncated or another format?): {e}") from e
  layers = []
  for group, v1 in ((net.layer, False), (net.layers, True)):
    for layer in group:
      if layer.blobs:
        kind = V1_LAYER_TYPES.get(layer.type, f"V1:{layer.type}") if v1 else layer.type
        blobs = [_blob_array(b, raw, f"{path}: layer {layer.name} blob {i}") for i, b in enumerate(layer.blobs)]
        layers.append(CaffeLayer(layer.name, kind, blobs))
  return layers


def read_caffemodel_layers(path: str) -> list[CaffeLayer]:
  """Layers that carry blobs, in file order (new `layer` or old V1 `layers` format)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such caffemodel file")
  with open(path, "rb") as f:
    data = f.read()
  try:
    layers = _parse(path, data, raw=True)
  except _Unpacked:
    layers = _parse(path, data, raw=False)
  if not layers:
    raise CheckpointError(f"{path}: no layer with weights found; is this a .caffemodel (not a .prototxt)?")
  return layers


def read_caffemodel(path: str) -> dict[str, list[np.ndarray]]:
  """{layer name: [blob arrays]} of a `.caffemodel`; blobs shaped by `shape` or num/channels/height/width."""
  return {layer.name: layer.blobs for layer in read_caffemodel_layers(path)}


def _fill_blob(blob: Any, array: np.ndarray, legacy_4d: bool) -> None:
  array = np.asarray(array, dtype="<f4")
  if legacy_4d:
    if array.ndim > 4:
      raise ValueError(f"a legacy blob has at most 4 dims, got shape {array.shape}")
    blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
  else:
    blob.shape.dim.extend(array.shape)
  blob.data.append(np.ascontiguousarray(array).tobytes())  # the packed-float payload


def write_caffemodel(path: str, layers: dict[str, list[np.ndarray]], old_format: bool = False,
                     types: dict[str, str] | None = None) -> None:
  """Writes a `.caffemodel` holding `layers` ({name: blobs}), readable by Caffe.

  The layer type defaults to 'InnerProduct' for names starting with 'fc' and 'Convolution' otherwise.
  `old_format` writes V1 `layers` with legacy 4-D blobs (InnerProduct weights become (1, 1, out, in)).
  """
  net = RAW["NetParameter"](name=os.path.splitext(os.path.basename(path))[0])
  for name, blobs in layers.items():
    kind = (types or {}).get(name) or ("InnerProduct" if name.startswith("fc") else "Convolution")
    if old_format:
      layer = net.layers.add(name=name, type=V1_TYPE_CODES[kind])
    else:
      layer = net.layer.add(name=name, type=kind)
    for array in blobs:
      _fill_blob(layer.blobs.add(), array, legacy_4d=old_format)
  with open(path, "wb") as f:
    f.write(net.SerializeToString())
