"""MobileNetV2 converter (torchvision `.pth`, Keras `.h5`) and the helpers shared with EfficientNet.

`WeightMapper` renames source layers into the Flax tree (torch OIHW -> HWIO, Linear (out, in) ->
(in, out), BatchNorm weight/bias/running stats -> params scale/bias, batch_stats mean/var; Keras
depthwise (k, k, C, 1) -> (k, k, 1, C)), remembers which source entries it consumed, and assembles
strictly: a missing, extra or misshapen layer is an error, never a partial load. `map_mbconv_net` walks a
MobileNetV2 / EfficientNet (stem, MBConv blocks, head conv, classifier); each format only supplies its
source layer names (`UnitNames` per block part).
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from agejax.errors import CheckpointError
from agejax.models.mobilenet import mobilenet_v2_layout
from agejax.models.pretrained import TORCHVISION_RGB, Preprocess
from agejax.models.registry import build_model
from agejax.porting.common import abstract_variables, fill_variables, unused_keys_error

BACKBONE = "params/backbone"
HEAD = "params/head/fc"
# Keras MobileNetV2 expects x / 127.5 - 1.
KERAS_MOBILENET_RGB = Preprocess("RGB", 255.0, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5), 256, 224)
Layout = Literal["torch", "keras"]
# (source conv, source BatchNorm) of one ConvBN unit; for 'se', (reduce conv, expand conv), both with bias.
UnitNames = tuple[str, str]
# Per layout, the suffixes of a layer's kernel, bias and BatchNorm entries (the latter in FLAX_BN's order).
KEYS = {"torch": {"kernel": ".weight", "bias": ".bias", "bn": (".weight", ".bias", ".running_mean", ".running_var")},
        "keras": {"kernel": "/kernel", "bias": "/bias", "bn": ("/gamma", "/beta", "/moving_mean", "/moving_variance")}}
FLAX_BN = (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))


class WeightMapper:
  """Collects converted arrays under Flax names and which source entries were consumed."""

  def __init__(self, entries: Mapping[str, np.ndarray], source: str, layout: Layout = "torch"):
    self.entries = dict(entries)
    self.source = source
    self.layout = layout  # the source's key names and kernel layout
    self.out: dict[str, np.ndarray] = {}
    self.used: set[str] = set()

  @classmethod
  def read(cls, path: str, layout: Layout) -> "WeightMapper":
    """A mapper over the entries of a torch state dict or a Keras .h5 weights file."""
    return cls(keras_entries(path) if layout == "keras" else torch_entries(path), path, layout)

  def take(self, key: str) -> np.ndarray | None:
    """The source entry `key` (marked consumed), or None when absent (reported later as missing)."""
    if key not in self.entries:
      return None
    self.used.add(key)
    return np.asarray(self.entries[key], np.float32)

  def put(self, name: str, value: np.ndarray | None) -> None:
    if value is not None:
      self.out[name] = value

  def _kernel(self, src: str) -> np.ndarray | None:
    """A conv or dense kernel as the file stores it (torch OIHW / (out, in); Keras HWIO / (in, out))."""
    return self.take(f"{src}{KEYS[self.layout]['kernel']}")

  def _bias(self, dst: str, src: str) -> None:
    self.put(f"{dst}/bias", self.take(f"{src}{KEYS[self.layout]['bias']}"))

  def conv(self, src: str, dst: str, bias: bool = False, depthwise: bool = False) -> None:
    """Conv `src` into backbone layer `dst`; torch depthwise weights (C, 1, k, k) are plain OIHW."""
    if self.layout == "keras" and depthwise:
      self._keras_depthwise(src, dst)
      return
    w = self._kernel(src)
    if w is not None and self.layout == "torch":
      w = _oihw_to_hwio(w, src)
    self.put(f"{BACKBONE}/{dst}/kernel", w)
    if bias:
      self._bias(f"{BACKBONE}/{dst}", src)

  def _keras_depthwise(self, layer: str, dst: str) -> None:
    # Keras 2 names it 'depthwise_kernel', Keras 3 just 'kernel'.
    key = f"{layer}/depthwise_kernel" if f"{layer}/depthwise_kernel" in self.entries else f"{layer}/kernel"
    w = self.take(key)
    if w is not None and w.ndim != 4:
      raise CheckpointError(f"{self.source}: layer {layer}: depthwise kernel of shape {w.shape}, expected (k, k, C, 1)")
    self.put(f"{BACKBONE}/{dst}/kernel", None if w is None else w.transpose(0, 1, 3, 2))

  def bn(self, src: str, dst: str) -> None:
    """BatchNorm `src` into `dst`: scale and bias in params, running mean and variance in batch_stats."""
    for s, (root, leaf) in zip(KEYS[self.layout]["bn"], FLAX_BN, strict=True):
      self.put(f"{root}/backbone/{dst}/{leaf}", self.take(f"{src}{s}"))

  def conv_bn(self, names: UnitNames, dst: str, depthwise: bool = False) -> None:
    """The ConvBN unit `dst` (its `conv` and `bn`) from the source conv and BatchNorm `names`."""
    self.conv(names[0], f"{dst}/conv", depthwise=depthwise)
    self.bn(names[1], f"{dst}/bn")

  def dense(self, src: str) -> None:
    """The classifier `src` into the head."""
    w = self._kernel(src)
    self.put(f"{HEAD}/kernel", w.T if w is not None and self.layout == "torch" else w)
    self._bias(HEAD, src)

  def num_classes(self) -> int:
    kernel = self.out.get(f"{HEAD}/kernel")
    if kernel is None:
      raise CheckpointError(f"{self.source}: no classifier layer found (a headless 'notop' file?); "
                            "agejax priors keep the checkpoint's classifier, so port a file that has one")
    return int(kernel.shape[1])

  def assemble(self, spec: Mapping[str, Any], image_size: int = 64) -> Any:
    """Variables of `spec`'s model holding exactly the collected arrays, or a CheckpointError."""
    abstract = abstract_variables(build_model(spec), image_size)
    unused = sorted(set(self.entries) - self.used)
    try:
      variables = fill_variables(abstract, self.out, self.source)
    except CheckpointError as e:
      if unused:
        raise CheckpointError(f"{e}\n  {unused_keys_error(self.source, unused)}") from None
      raise
    if unused:
      raise unused_keys_error(self.source, unused)
    return variables


def _oihw_to_hwio(w: np.ndarray, name: str) -> np.ndarray:
  if w.ndim != 4:
    raise CheckpointError(f"layer {name}: conv weight of shape {w.shape}, expected 4-D (out, in, kh, kw)")
  return w.transpose(2, 3, 1, 0)


def keras_entries(path: str) -> dict[str, np.ndarray]:
  """{'layer/short_name': array} from a legacy Keras .h5 weights file."""
  from agejax.porting.keras_io import flat_weights, read_h5_weights

  return flat_weights(read_h5_weights(path), path)


def torch_entries(path: str) -> dict[str, np.ndarray]:
  from agejax.porting.torch_io import load_state_dict

  return load_state_dict(path)


@dataclasses.dataclass(frozen=True)
class BlockNames:
  """One MBConv block's source layer names, {part: UnitNames} over 'expand', 'dwconv', 'se', 'project', and
  which optional parts it has (the expand conv when hidden != in channels, squeeze-excitation)."""

  names: Mapping[str, UnitNames]
  expand: bool
  squeeze: bool = False


def map_mbconv_net(m: WeightMapper, stem: UnitNames, blocks: Sequence[BlockNames], head: UnitNames,
                   classifier: str) -> WeightMapper:
  """Maps `stem`, `blocks_{i}` (expand, dwconv, se, project), `head_conv` and the classifier into `m`."""
  m.conv_bn(stem, "stem")
  for i, b in enumerate(blocks):
    dst = f"blocks_{i}"
    for part in ("expand",) * b.expand + ("dwconv", "project"):
      m.conv_bn(b.names[part], f"{dst}/{part}", depthwise=part == "dwconv")
    if b.squeeze:
      reduce, expand = b.names["se"]
      m.conv(reduce, f"{dst}/se/fc1", bias=True)
      m.conv(expand, f"{dst}/se/fc2", bias=True)
  m.conv_bn(head, "head_conv")
  m.dense(classifier)
  return m


def _torchvision_names(i: int, expand: bool) -> dict[str, UnitNames]:
  src, k = f"features.{i + 1}.conv", int(expand)
  return {"expand": (f"{src}.0.0", f"{src}.0.1"), "dwconv": (f"{src}.{k}.0", f"{src}.{k}.1"),
          "project": (f"{src}.{k + 1}", f"{src}.{k + 2}")}


def _keras_names(i: int) -> dict[str, UnitNames]:
  prefix = "expanded_conv_" if i == 0 else f"block_{i}_"
  return {"expand": (f"{prefix}expand", f"{prefix}expand_BN"),
          "dwconv": (f"{prefix}depthwise", f"{prefix}depthwise_BN"),
          "project": (f"{prefix}project", f"{prefix}project_BN")}


def _map(path: str, layout: Layout) -> WeightMapper:
  _, layout_blocks, _ = mobilenet_v2_layout()
  expands = [hidden != cin for cin, hidden, _, _ in layout_blocks]
  m = WeightMapper.read(path, layout)
  if layout == "torch":
    blocks = [BlockNames(_torchvision_names(i, e), e) for i, e in enumerate(expands)]
    last = f"features.{len(blocks) + 1}"
    return map_mbconv_net(m, ("features.0.0", "features.0.1"), blocks, (f"{last}.0", f"{last}.1"), "classifier.1")
  blocks = [BlockNames(_keras_names(i), e) for i, e in enumerate(expands)]
  return map_mbconv_net(m, ("Conv1", "bn_Conv1"), blocks, ("Conv_1", "Conv_1_bn"), "predictions")


def convert(fmt: str, src: str, arch: str, **options: Any) -> tuple[dict, Any, Preprocess]:
  """MobileNetV2 from torchvision or Keras weights; `options` override backbone constructor fields."""
  if arch != "mobilenet_v2":
    raise CheckpointError(f"the MobileNet converter handles arch 'mobilenet_v2', not {arch!r}")
  if fmt == "torchvision":
    mapper = _map(src, "torch")
    backbone = dict(padding="torch", bn_eps=1e-5, bn_momentum=0.9, dropout=0.2)
    preprocess = dataclasses.replace(TORCHVISION_RGB, resize=256, crop=224)
  elif fmt == "keras":
    mapper = _map(src, "keras")
    # Keras pads stride-2 convs with ZeroPadding2D(correct_pad) + 'valid', which is TF 'SAME'.
    backbone = dict(padding="tf_same", bn_eps=1e-3, bn_momentum=0.999, dropout=0.0)
    preprocess = KERAS_MOBILENET_RGB
  else:
    raise CheckpointError(f"MobileNetV2 weights in format {fmt!r} are not supported; use torchvision or keras")
  spec = {"arch": arch, "head": "classes", "num_classes": mapper.num_classes(), "backbone": {**backbone, **options}}
  return spec, mapper.assemble(spec), preprocess
