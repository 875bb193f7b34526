"""VGG-16 converters: torchvision, Keras `.h5`, Caffe `.caffemodel` (DEX, VGG-Face) and `vgg_face_dag.pth`.

Every format is first read into a flat {source key: array} mapping, then each layer of the agejax model
is looked up by its source keys, shape-checked in the source layout, and transposed to Flax layout.
Checkpoint entries that no layer used are an error, so another architecture's file cannot slip through.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from agejax.errors import CheckpointError
from agejax.models.pretrained import CAFFE_BGR, KERAS_CAFFE_BGR, TORCHVISION_RGB, VGGFACE_RGB, Preprocess
from agejax.models.registry import build_model
from agejax.models.vgg import VGG16_BLOCKS
from agejax.porting.common import abstract_variables, fill_variables, flatten_variables, unused_keys_error

FORMATS = ("torchvision", "keras", "caffe", "vggface-dag")
IMAGE_SIZE = 224
FC6_SIDE = IMAGE_SIZE // 32  # conv5_3 output is 7x7 at 224 px
CONV_NAMES = tuple(f"conv{b}_{i}" for b, (n, _) in enumerate(VGG16_BLOCKS, start=1) for i in range(1, n + 1))
# torchvision's `features` indices of the 13 convolutions (ReLUs and pools take the others).
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
HEAD = "params/head/fc"
PREPROCESS = {"torchvision": TORCHVISION_RGB, "keras": KERAS_CAFFE_BGR, "caffe": CAFFE_BGR,
              "vggface-dag": VGGFACE_RGB}


@dataclasses.dataclass(frozen=True)
class LayerMap:
  """Where one Flax layer's kernel and bias come from in the checkpoint."""

  target: str  # 'params/backbone/conv1_1'
  weight: str  # source key of the kernel
  bias: str
  kind: str  # 'conv' | 'dense' | 'fc6' (a dense layer fed by the flattened conv5_3 map)


def _target(name: str) -> str:
  return f"params/backbone/{name}"


def _named_maps(weight_fmt: str, bias_fmt: str, names: Mapping[str, str]) -> list[LayerMap]:
  """Maps for formats whose keys are '{layer}{suffix}'; `names` is {our layer: their layer}."""
  maps = []
  for ours, theirs in names.items():
    target = HEAD if ours == "head" else _target(ours)
    kind = "conv" if ours.startswith("conv") else "fc6" if ours == "fc6" else "dense"
    maps.append(LayerMap(target, weight_fmt.format(theirs), bias_fmt.format(theirs), kind))
  return maps


def torchvision_maps() -> list[LayerMap]:
  names = {c: f"features.{i}" for c, i in zip(CONV_NAMES, TORCHVISION_CONV_INDICES, strict=True)}
  names |= {"fc6": "classifier.0", "fc7": "classifier.3", "head": "classifier.6"}
  return _named_maps("{}.weight", "{}.bias", names)


def vggface_dag_maps() -> list[LayerMap]:
  names = {c: c for c in CONV_NAMES} | {"fc6": "fc6", "fc7": "fc7", "head": "fc8"}
  return _named_maps("{}.weight", "{}.bias", names)


def keras_maps() -> list[LayerMap]:
  names = {f"conv{b}_{i}": f"block{b}_conv{i}" for b, (n, _) in enumerate(VGG16_BLOCKS, start=1)
           for i in range(1, n + 1)}
  names |= {"fc6": "fc1", "fc7": "fc2", "head": "predictions"}
  return _named_maps("{}/kernel", "{}/bias", names)


def caffe_maps(head_layer: str) -> list[LayerMap]:
  names = {c: c for c in CONV_NAMES} | {"fc6": "fc6", "fc7": "fc7", "head": head_layer}
  return _named_maps("{}/0", "{}/1", names)


def _source_shape(kind: str, layout: str, target_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The kernel shape a checkpoint in `layout` must have for a Flax kernel of `target_shape`."""
  if layout == "keras":
    return target_shape
  if kind == "conv":  # OIHW
    kh, kw, cin, cout = target_shape
    return (cout, cin, kh, kw)
  return (target_shape[1], target_shape[0])  # (out, in)


def _to_flax(kind: str, layout: str, w: np.ndarray) -> np.ndarray:
  if layout == "keras":  # HWIO kernels, Dense (in, out) after an NHWC flatten: nothing to do
    return w
  if kind == "conv":
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if kind == "fc6":
    # torch and Caffe flatten conv5_3 as (C, H, W); Flax flattens NHWC as (H, W, C).
    out, fan_in = w.shape
    channels = fan_in // (FC6_SIDE * FC6_SIDE)
    return w.reshape(out, channels, FC6_SIDE, FC6_SIDE).transpose(2, 3, 1, 0).reshape(fan_in, out)
  return w.T


def _squeeze_leading(a: np.ndarray, ndim: int) -> np.ndarray:
  # Old Caffe blobs are 4-D: InnerProduct weights (1, 1, out, in), biases (1, 1, 1, out).
  while a.ndim > ndim and a.shape[0] == 1:
    a = a[0]
  return a


def _check_names(source: Mapping[str, np.ndarray], maps: list[LayerMap], path: str) -> None:
  """Every mapped key present and every checkpoint entry used, before any shape is looked at."""
  missing = [f"{k} ({m.target.split('/')[-1]})" for m in maps for k in (m.weight, m.bias) if k not in source]
  if missing:
    have = ", ".join(sorted(source)[:6])
    raise CheckpointError(f"{path}: not a VGG-16 checkpoint in this format; missing {len(missing)} entries: "
                          f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} (the file has: {have} ...)")
  used = {k for m in maps for k in (m.weight, m.bias)}
  unused = sorted(set(source) - used)
  if unused:
    raise unused_keys_error(path, unused)


def convert_layers(source: Mapping[str, np.ndarray], maps: list[LayerMap], abstract: Any, layout: str,
                   path: str) -> dict[str, np.ndarray]:
  """Flat {flax path: array} for every mapped layer; raises naming the layer and both shapes."""
  want = flatten_variables(abstract)
  out, problems = {}, []
  for m in maps:
    layer = m.target.split("/")[-1]
    k_shape, b_shape = tuple(want[f"{m.target}/kernel"].shape), tuple(want[f"{m.target}/bias"].shape)
    w_want = _source_shape(m.kind, layout, k_shape)
    w = _squeeze_leading(np.asarray(source[m.weight], np.float32), len(w_want))
    b = _squeeze_leading(np.asarray(source[m.bias], np.float32), len(b_shape))
    if w.shape != w_want:
      hint = " (a channels_first / Theano file?)" if layout == "keras" and m.kind == "conv" else ""
      problems.append(f"layer {layer} ({m.weight}): checkpoint shape {w.shape} != expected {w_want}{hint}")
    if b.shape != b_shape:
      problems.append(f"layer {layer} ({m.bias}): checkpoint shape {b.shape} != expected {b_shape}")
    if w.shape == w_want and b.shape == b_shape:
      out[f"{m.target}/kernel"] = _to_flax(m.kind, layout, w)
      out[f"{m.target}/bias"] = b
  if problems:
    raise CheckpointError(f"{path} does not fit VGG-16:\n  " + "\n  ".join(problems))
  return out


def model_spec(num_classes: int) -> dict[str, Any]:
  """A VGG-16 spec keeping the checkpoint's classifier: 'dex' for 101 age bins, else 'classes'."""
  return {"arch": "vgg16", "head": "dex" if num_classes == 101 else "classes", "num_classes": num_classes,
          "backbone": {}}


def _read_torch(src: str) -> dict[str, np.ndarray]:
  from agejax.porting.torch_io import load_state_dict
  return load_state_dict(src)


def _read_keras(src: str) -> dict[str, np.ndarray]:
  from agejax.porting.keras_io import flat_weights, read_h5_weights
  layers = read_h5_weights(src)
  if "fc1" not in layers or "predictions" not in layers:
    raise CheckpointError(f"{src}: no fc1/fc2/predictions layers; a VGG-16 prior needs the weights saved with "
                          "include_top=True")
  return flat_weights(layers, src)


def caffe_head_layer(layers: list[Any], src: str, head_layer: str | None = None) -> str:
  """The final classifier: `head_layer`, else fc8 / fc8-101, else the one InnerProduct besides fc6/fc7."""
  names = [layer.name for layer in layers]
  if head_layer is not None:
    if head_layer not in names:
      raise CheckpointError(f"{src}: no layer {head_layer!r}; layers with weights: {', '.join(names)}")
    return head_layer
  for name in ("fc8", "fc8-101"):
    if name in names:
      return name
  candidates = [layer.name for layer in layers if layer.type == "InnerProduct" and layer.name not in ("fc6", "fc7")]
  if len(candidates) != 1:
    found = ", ".join(candidates) or "none"
    raise CheckpointError(f"{src}: cannot tell the final classifier (InnerProduct layers besides fc6/fc7: {found}); "
                          "pass head_layer=NAME")
  return candidates[0]


def _read_caffe(src: str, head_layer: str | None) -> tuple[dict[str, np.ndarray], str]:
  from agejax.porting.caffe import read_caffemodel_layers
  layers = read_caffemodel_layers(src)
  flat = {}
  for layer in layers:
    if len(layer.blobs) > 2:
      raise CheckpointError(f"{src}: layer {layer.name} has {len(layer.blobs)} blobs; expected weights and bias")
    for i, blob in enumerate(layer.blobs):
      flat[f"{layer.name}/{i}"] = blob
  return flat, caffe_head_layer(layers, src, head_layer)


def _num_classes(source: Mapping[str, np.ndarray], head: LayerMap, src: str) -> int:
  if head.bias not in source:
    raise CheckpointError(f"{src}: no final classifier {head.bias!r}; is this a VGG-16 checkpoint with its top?")
  return int(np.asarray(source[head.bias]).size)


def convert(fmt: str, src: str, arch: str = "vgg16", **options: Any) -> tuple[dict[str, Any], Any, Preprocess]:
  """Reads a VGG-16 checkpoint; returns (model spec, Flax variables, the preprocessing it expects).

  Options: `head_layer` (caffe only) names the final InnerProduct when it is not fc8 / fc8-101.
  """
  if arch != "vgg16":
    raise CheckpointError(f"agejax.porting.vgg converts vgg16 only, not {arch!r}")
  if fmt not in FORMATS:
    raise CheckpointError(f"{src}: format {fmt!r} is not a VGG-16 format; expected one of {', '.join(FORMATS)}")
  head_layer = options.pop("head_layer", None)
  if options or (head_layer is not None and fmt != "caffe"):
    unknown = sorted(options) + (["head_layer"] if head_layer is not None and fmt != "caffe" else [])
    raise CheckpointError(f"unknown option(s) for {fmt} VGG-16 conversion: {', '.join(unknown)}")
  if fmt == "caffe":
    source, head = _read_caffe(src, head_layer)
    maps, layout = caffe_maps(head), "caffe"
  elif fmt == "keras":
    source, maps, layout = _read_keras(src), keras_maps(), "keras"
  else:
    maps = torchvision_maps() if fmt == "torchvision" else vggface_dag_maps()
    source, layout = _read_torch(src), "torch"
  _check_names(source, maps, src)
  spec = model_spec(_num_classes(source, maps[-1], src))
  abstract = abstract_variables(build_model(spec), IMAGE_SIZE)
  converted = convert_layers(source, maps, abstract, layout, src)
  return spec, fill_variables(abstract, converted, src), PREPROCESS[fmt]
