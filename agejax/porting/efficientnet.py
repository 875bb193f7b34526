"""EfficientNet converter: torchvision B0-B7, Keras B0-B7 (`.h5`), and the efficientnet_lite_pytorch layout.

The 'efficientnet-lite' format is lukemelas' EfficientNet-PyTorch naming (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1[/_se_reduce/_se_expand]/_project_conv/_bn2`,
`_conv_head`, `_bn1`, `_fc`), used by the Lite0-Lite4 ports; B-variant files in that layout also port
(TF 'SAME' padding, BN eps 1e-3). Keras EfficientNet normalises inside the model (Rescaling 1/255 and a
Normalization layer with stored mean/variance); those are folded into the prior's Preprocess.
"""

import dataclasses
from typing import Any

import numpy as np

from agejax.errors import CheckpointError
from agejax.models.efficientnet import VARIANTS, efficientnet_layout, variant_defaults
from agejax.models.pretrained import LITE_RGB, TORCHVISION_RGB, Preprocess
from agejax.porting.mobilenet import WeightMapper, keras_entries, torch_entries

# torchvision's (resize, crop) per B variant (IMAGENET1K_V1 weights).
TORCHVISION_SIZES = {
    "efficientnet_b0": (256, 224), "efficientnet_b1": (256, 240), "efficientnet_b2": (288, 288),
    "efficientnet_b3": (320, 300), "efficientnet_b4": (384, 380), "efficientnet_b5": (456, 456),
    "efficientnet_b6": (528, 528), "efficientnet_b7": (600, 600),
}
# Training resolution of the TF models (Keras `default_size`, the Lite builder).
TF_RESOLUTION = {
    "efficientnet_b0": 224, "efficientnet_b1": 240, "efficientnet_b2": 260, "efficientnet_b3": 300,
    "efficientnet_b4": 380, "efficientnet_b5": 456, "efficientnet_b6": 528, "efficientnet_b7": 600,
    "efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260, "efficientnet_lite3": 280,
    "efficientnet_lite4": 300,
}
# Keras' ImageNet EfficientNet files store these as the Normalization "variance"; the model then
# multiplies by 1/sqrt(std) in a weightless Rescaling layer, so the net effect divides by std.
KERAS_IMAGENET_STD = (0.229, 0.224, 0.225)


def _tf_preprocess(base: Preprocess, arch: str) -> Preprocess:
  crop = TF_RESOLUTION[arch]
  return dataclasses.replace(base, crop=crop, resize=int(round(crop * 256 / 224)))


def _torchvision(path: str, arch: str) -> WeightMapper:
  m = WeightMapper(torch_entries(path), path)
  m.torch_conv("features.0.0", "stem/conv")
  m.torch_bn("features.0.1", "stem/bn")
  _, blocks, _ = _layout(arch)
  for i, b in enumerate(blocks):
    src = f"features.{b.stage + 1}.{b.index}.block"
    parts = (["expand"] if b.hidden != b.cin else []) + ["dwconv", "se", "project"]
    for k, part in enumerate(parts):
      dst = f"blocks_{i}/{part}"
      if part == "se":
        m.torch_conv(f"{src}.{k}.fc1", f"{dst}/fc1", bias=True)
        m.torch_conv(f"{src}.{k}.fc2", f"{dst}/fc2", bias=True)
      else:
        m.torch_conv(f"{src}.{k}.0", f"{dst}/conv")
        m.torch_bn(f"{src}.{k}.1", f"{dst}/bn")
  last = max(b.stage for b in blocks) + 2
  m.torch_conv(f"features.{last}.0", "head_conv/conv")
  m.torch_bn(f"features.{last}.1", "head_conv/bn")
  m.torch_linear("classifier.1")
  return m


def _lite(path: str, arch: str) -> WeightMapper:
  m = WeightMapper(torch_entries(path), path)
  m.torch_conv("_conv_stem", "stem/conv")
  m.torch_bn("_bn0", "stem/bn")
  _, blocks, _ = _layout(arch)
  for i, b in enumerate(blocks):
    src, dst = f"_blocks.{i}", f"blocks_{i}"
    if b.hidden != b.cin:
      m.torch_conv(f"{src}._expand_conv", f"{dst}/expand/conv")
      m.torch_bn(f"{src}._bn0", f"{dst}/expand/bn")
    m.torch_conv(f"{src}._depthwise_conv", f"{dst}/dwconv/conv")
    m.torch_bn(f"{src}._bn1", f"{dst}/dwconv/bn")
    if b.squeeze:
      m.torch_conv(f"{src}._se_reduce", f"{dst}/se/fc1", bias=True)
      m.torch_conv(f"{src}._se_expand", f"{dst}/se/fc2", bias=True)
    m.torch_conv(f"{src}._project_conv", f"{dst}/project/conv")
    m.torch_bn(f"{src}._bn2", f"{dst}/project/bn")
  m.torch_conv("_conv_head", "head_conv/conv")
  m.torch_bn("_bn1", "head_conv/bn")
  m.torch_linear("_fc")
  return m


def _keras(path: str, arch: str) -> tuple[WeightMapper, Preprocess]:
  entries = keras_entries(path)
  m = WeightMapper(entries, path)
  m.keras_conv("stem_conv", "stem/conv")
  m.keras_bn("stem_bn", "stem/bn")
  _, blocks, _ = _layout(arch)
  for i, b in enumerate(blocks):
    src, dst = f"block{b.stage + 1}{chr(ord('a') + b.index)}_", f"blocks_{i}"
    if b.hidden != b.cin:
      m.keras_conv(f"{src}expand_conv", f"{dst}/expand/conv")
      m.keras_bn(f"{src}expand_bn", f"{dst}/expand/bn")
    m.keras_depthwise(f"{src}dwconv", f"{dst}/dwconv/conv")
    m.keras_bn(f"{src}bn", f"{dst}/dwconv/bn")
    m.keras_conv(f"{src}se_reduce", f"{dst}/se/fc1", bias=True)
    m.keras_conv(f"{src}se_expand", f"{dst}/se/fc2", bias=True)
    m.keras_conv(f"{src}project_conv", f"{dst}/project/conv")
    m.keras_bn(f"{src}project_bn", f"{dst}/project/bn")
  m.keras_conv("top_conv", "head_conv/conv")
  m.keras_bn("top_bn", "head_conv/bn")
  m.keras_dense("predictions")
  return m, _keras_normalization(m, arch)


def _keras_normalization(m: WeightMapper, arch: str) -> Preprocess:
  """Folds the model's Rescaling(1/255) + Normalization(mean, variance) into a Preprocess."""
  layers = sorted({k.split("/")[0] for k in m.entries if k.split("/")[0].startswith("normalization")})
  if len(layers) != 1:
    raise CheckpointError(f"{m.source}: expected one Normalization layer inside the Keras EfficientNet, "
                          f"found {layers or 'none'}; cannot tell the input normalisation")
  mean, var = m.take(f"{layers[0]}/mean"), m.take(f"{layers[0]}/variance")
  m.take(f"{layers[0]}/count")
  if mean is None or var is None or mean.size != 3 or var.size != 3:
    raise CheckpointError(f"{m.source}: layer {layers[0]}: expected 3-channel mean and variance, got "
                          f"{None if mean is None else mean.shape} and {None if var is None else var.shape}")
  var = var.reshape(3)
  std = var if np.allclose(var, KERAS_IMAGENET_STD, atol=1e-4) else np.sqrt(np.maximum(var, 0.0))
  std = np.maximum(std, 1e-7)  # Keras floors sqrt(variance) at its epsilon
  base = Preprocess("RGB", 1.0, tuple(float(v) for v in mean.reshape(3)), tuple(float(v) for v in std))
  return _tf_preprocess(base, arch)


def _layout(arch: str) -> tuple:
  v = variant_defaults(arch)
  return efficientnet_layout(v["width_mult"], v["depth_mult"], v["lite"])


def convert(fmt: str, src: str, arch: str, **options: Any) -> tuple[dict, Any, Preprocess]:
  """EfficientNet B0-B7 / Lite0-Lite4; `options` override backbone constructor fields."""
  if arch not in VARIANTS:
    raise CheckpointError(f"unknown EfficientNet arch {arch!r}; known: {', '.join(VARIANTS)}")
  lite = VARIANTS[arch][3]
  tf_bn = dict(padding="tf_same", bn_eps=1e-3, bn_momentum=0.99)
  if fmt == "torchvision":
    if lite:
      raise CheckpointError(f"torchvision has no {arch}; Lite weights come in the 'efficientnet-lite' format")
    mapper = _torchvision(src, arch)
    d = variant_defaults(arch)
    backbone = dict(padding="torch", bn_eps=d.get("bn_eps", 1e-5), bn_momentum=d.get("bn_momentum", 0.9))
    resize, crop = TORCHVISION_SIZES[arch]
    preprocess = dataclasses.replace(TORCHVISION_RGB, resize=resize, crop=crop)
  elif fmt == "efficientnet-lite":
    mapper = _lite(src, arch)
    backbone = tf_bn
    preprocess = _tf_preprocess(LITE_RGB, arch) if lite else _tf_preprocess(TORCHVISION_RGB, arch)
  elif fmt == "keras":
    if lite:
      raise CheckpointError(f"keras.applications has no {arch}; use the 'efficientnet-lite' format")
    mapper, preprocess = _keras(src, arch)
    backbone = tf_bn
  else:
    raise CheckpointError(f"EfficientNet weights in format {fmt!r} are not supported; "
                          "use torchvision, keras or efficientnet-lite")
  spec = {"arch": arch, "head": "classes", "num_classes": mapper.num_classes(), "backbone": {**backbone, **options}}
  return spec, mapper.assemble(spec), preprocess
