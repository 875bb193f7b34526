"""MobileNetV2 converter (torchvision `.pth`, Keras `.h5`) and the helpers shared with EfficientNet.

`WeightMapper` renames source layers into the Flax tree (torch OIHW -> HWIO, Linear (out, in) ->
(in, out), BatchNorm weight/bias/running stats -> params scale/bias, batch_stats mean/var; Keras
depthwise (k, k, C, 1) -> (k, k, 1, C)), remembers which source entries it consumed, and assembles
strictly: a missing, extra or misshapen layer is an error, never a partial load.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from agejax.errors import CheckpointError
from agejax.models.mobilenet import mobilenet_v2_layout
from agejax.models.pretrained import TORCHVISION_RGB, Preprocess
from agejax.models.registry import build_model
from agejax.porting.common import abstract_variables, fill_variables, unused_keys_error

BACKBONE = "params/backbone"
STATS = "batch_stats/backbone"
HEAD = "params/head/fc"
# Keras MobileNetV2 expects x / 127.5 - 1.
KERAS_MOBILENET_RGB = Preprocess("RGB", 255.0, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5), 256, 224)


class WeightMapper:
  """Collects converted arrays under Flax names and which source entries were consumed."""

  def __init__(self, entries: Mapping[str, np.ndarray], source: str):
    self.entries = dict(entries)
    self.source = source
    self.out: dict[str, np.ndarray] = {}
    self.used: set[str] = set()

  def take(self, key: str) -> np.ndarray | None:
    """The source entry `key` (marked consumed), or None when absent (reported later as missing)."""
    if key not in self.entries:
      return None
    self.used.add(key)
    return np.asarray(self.entries[key], np.float32)

  def put(self, name: str, value: np.ndarray | None) -> None:
    if value is not None:
      self.out[name] = value

  def torch_conv(self, src: str, dst: str, bias: bool = False) -> None:
    w = self.take(f"{src}.weight")
    self.put(f"{BACKBONE}/{dst}/kernel", None if w is None else _oihw_to_hwio(w, src))
    if bias:
      self.put(f"{BACKBONE}/{dst}/bias", self.take(f"{src}.bias"))

  def torch_bn(self, src: str, dst: str) -> None:
    for s, d in (("weight", "params/scale"), ("bias", "params/bias"),
                 ("running_mean", "batch_stats/mean"), ("running_var", "batch_stats/var")):
      root, leaf = d.split("/")
      self.put(f"{root}/backbone/{dst}/{leaf}", self.take(f"{src}.{s}"))

  def torch_linear(self, src: str) -> None:
    w = self.take(f"{src}.weight")
    self.put(f"{HEAD}/kernel", None if w is None else w.T)
    self.put(f"{HEAD}/bias", self.take(f"{src}.bias"))

  def keras_conv(self, layer: str, dst: str, bias: bool = False) -> None:
    self.put(f"{BACKBONE}/{dst}/kernel", self.take(f"{layer}/kernel"))
    if bias:
      self.put(f"{BACKBONE}/{dst}/bias", self.take(f"{layer}/bias"))

  def keras_depthwise(self, layer: str, dst: str) -> None:
    # Keras 2 names it 'depthwise_kernel', Keras 3 just 'kernel'.
    key = f"{layer}/depthwise_kernel" if f"{layer}/depthwise_kernel" in self.entries else f"{layer}/kernel"
    w = self.take(key)
    if w is not None and w.ndim != 4:
      raise CheckpointError(f"{self.source}: layer {layer}: depthwise kernel of shape {w.shape}, expected (k, k, C, 1)")
    self.put(f"{BACKBONE}/{dst}/kernel", None if w is None else w.transpose(0, 1, 3, 2))

  def keras_bn(self, layer: str, dst: str) -> None:
    for s, d in (("gamma", "params/scale"), ("beta", "params/bias"),
                 ("moving_mean", "batch_stats/mean"), ("moving_variance", "batch_stats/var")):
      root, leaf = d.split("/")
      self.put(f"{root}/backbone/{dst}/{leaf}", self.take(f"{layer}/{s}"))

  def keras_dense(self, layer: str) -> None:
    self.put(f"{HEAD}/kernel", self.take(f"{layer}/kernel"))
    self.put(f"{HEAD}/bias", self.take(f"{layer}/bias"))

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
  from agejax.porting.keras_io import read_h5_weights

  entries = {}
  for layer, weights in read_h5_weights(path).items():
    for short, value in weights:
      key = f"{layer}/{short}"
      if key in entries:
        raise CheckpointError(f"{path}: layer {layer} has two weights named {short!r}")
      entries[key] = value
  return entries


def torch_entries(path: str) -> dict[str, np.ndarray]:
  from agejax.porting.torch_io import load_state_dict

  return load_state_dict(path)


def _torchvision(path: str, n_blocks: int) -> WeightMapper:
  m = WeightMapper(torch_entries(path), path)
  m.torch_conv("features.0.0", "stem/conv")
  m.torch_bn("features.0.1", "stem/bn")
  _, blocks, _ = mobilenet_v2_layout()
  for i in range(n_blocks):
    cin, hidden, _, _ = blocks[i]
    src, k = f"features.{i + 1}.conv", 0
    if hidden != cin:
      m.torch_conv(f"{src}.0.0", f"blocks_{i}/expand/conv")
      m.torch_bn(f"{src}.0.1", f"blocks_{i}/expand/bn")
      k = 1
    m.torch_conv(f"{src}.{k}.0", f"blocks_{i}/dwconv/conv")
    m.torch_bn(f"{src}.{k}.1", f"blocks_{i}/dwconv/bn")
    m.torch_conv(f"{src}.{k + 1}", f"blocks_{i}/project/conv")
    m.torch_bn(f"{src}.{k + 2}", f"blocks_{i}/project/bn")
  m.torch_conv(f"features.{n_blocks + 1}.0", "head_conv/conv")
  m.torch_bn(f"features.{n_blocks + 1}.1", "head_conv/bn")
  m.torch_linear("classifier.1")
  return m


def _keras(path: str, n_blocks: int) -> WeightMapper:
  m = WeightMapper(keras_entries(path), path)
  m.keras_conv("Conv1", "stem/conv")
  m.keras_bn("bn_Conv1", "stem/bn")
  for i in range(n_blocks):
    prefix = "expanded_conv_" if i == 0 else f"block_{i}_"
    if i:
      m.keras_conv(f"{prefix}expand", f"blocks_{i}/expand/conv")
      m.keras_bn(f"{prefix}expand_BN", f"blocks_{i}/expand/bn")
    m.keras_depthwise(f"{prefix}depthwise", f"blocks_{i}/dwconv/conv")
    m.keras_bn(f"{prefix}depthwise_BN", f"blocks_{i}/dwconv/bn")
    m.keras_conv(f"{prefix}project", f"blocks_{i}/project/conv")
    m.keras_bn(f"{prefix}project_BN", f"blocks_{i}/project/bn")
  m.keras_conv("Conv_1", "head_conv/conv")
  m.keras_bn("Conv_1_bn", "head_conv/bn")
  m.keras_dense("predictions")
  return m


def convert(fmt: str, src: str, arch: str, **options: Any) -> tuple[dict, Any, Preprocess]:
  """MobileNetV2 from torchvision or Keras weights; `options` override backbone constructor fields."""
  if arch != "mobilenet_v2":
    raise CheckpointError(f"the MobileNet converter handles arch 'mobilenet_v2', not {arch!r}")
  n_blocks = len(mobilenet_v2_layout()[1])
  if fmt == "torchvision":
    mapper = _torchvision(src, n_blocks)
    backbone = dict(padding="torch", bn_eps=1e-5, bn_momentum=0.9, dropout=0.2)
    preprocess = dataclasses.replace(TORCHVISION_RGB, resize=256, crop=224)
  elif fmt == "keras":
    mapper = _keras(src, n_blocks)
    # Keras pads stride-2 convs with ZeroPadding2D(correct_pad) + 'valid', which is TF 'SAME'.
    backbone = dict(padding="tf_same", bn_eps=1e-3, bn_momentum=0.999, dropout=0.0)
    preprocess = KERAS_MOBILENET_RGB
  else:
    raise CheckpointError(f"MobileNetV2 weights in format {fmt!r} are not supported; use torchvision or keras")
  spec = {"arch": arch, "head": "classes", "num_classes": mapper.num_classes(), "backbone": {**backbone, **options}}
  return spec, mapper.assemble(spec), preprocess
