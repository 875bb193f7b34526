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
from agejax.models.efficientnet import VARIANTS, Block, efficientnet_layout, variant_defaults
from agejax.models.pretrained import LITE_RGB, TORCHVISION_RGB, Preprocess
from agejax.porting.mobilenet import BlockNames, UnitNames, WeightMapper, map_mbconv_net

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


def _torchvision_names(i: int, b: Block) -> dict[str, UnitNames]:
  src = f"features.{b.stage + 1}.{b.index}.block"
  parts = (["expand"] if b.hidden != b.cin else []) + ["dwconv", "se", "project"]
  return {part: (f"{src}.{k}.fc1", f"{src}.{k}.fc2") if part == "se" else (f"{src}.{k}.0", f"{src}.{k}.1")
          for k, part in enumerate(parts)}


def _lite_names(i: int, b: Block) -> dict[str, UnitNames]:
  src = f"_blocks.{i}."
  return {"expand": (f"{src}_expand_conv", f"{src}_bn0"), "dwconv": (f"{src}_depthwise_conv", f"{src}_bn1"),
          "se": (f"{src}_se_reduce", f"{src}_se_expand"), "project": (f"{src}_project_conv", f"{src}_bn2")}


def _keras_names(i: int, b: Block) -> dict[str, UnitNames]:
  src = f"block{b.stage + 1}{chr(ord('a') + b.index)}_"
  return {"expand": (f"{src}expand_conv", f"{src}expand_bn"), "dwconv": (f"{src}dwconv", f"{src}bn"),
          "se": (f"{src}se_reduce", f"{src}se_expand"), "project": (f"{src}project_conv", f"{src}project_bn")}


BLOCK_NAMES = {"torchvision": _torchvision_names, "efficientnet-lite": _lite_names, "keras": _keras_names}


def _end_names(fmt: str, blocks: list[Block]) -> tuple[UnitNames, UnitNames, str]:
  """(stem, head conv, classifier) source names of a format."""
  if fmt == "torchvision":
    last = f"features.{max(b.stage for b in blocks) + 2}"
    return ("features.0.0", "features.0.1"), (f"{last}.0", f"{last}.1"), "classifier.1"
  if fmt == "efficientnet-lite":
    return ("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), "_fc"
  return ("stem_conv", "stem_bn"), ("top_conv", "top_bn"), "predictions"


def _map(fmt: str, path: str, arch: str) -> WeightMapper:
  """The mapper of a torchvision, efficientnet-lite or Keras file."""
  _, blocks, _ = _layout(arch)
  names = [BlockNames(BLOCK_NAMES[fmt](i, b), b.hidden != b.cin, bool(b.squeeze)) for i, b in enumerate(blocks)]
  stem, head, classifier = _end_names(fmt, blocks)
  m = WeightMapper.read(path, "keras" if fmt == "keras" else "torch")
  return map_mbconv_net(m, stem, names, head, classifier)


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


def _layout(arch: str) -> tuple[int, list[Block], int]:
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
    mapper = _map(fmt, src, arch)
    d = variant_defaults(arch)
    backbone = dict(padding="torch", bn_eps=d.get("bn_eps", 1e-5), bn_momentum=d.get("bn_momentum", 0.9))
    resize, crop = TORCHVISION_SIZES[arch]
    preprocess = dataclasses.replace(TORCHVISION_RGB, resize=resize, crop=crop)
  elif fmt == "efficientnet-lite":
    mapper = _map(fmt, src, arch)
    backbone = tf_bn
    preprocess = _tf_preprocess(LITE_RGB, arch) if lite else _tf_preprocess(TORCHVISION_RGB, arch)
  elif fmt == "keras":
    if lite:
      raise CheckpointError(f"keras.applications has no {arch}; use the 'efficientnet-lite' format")
    mapper = _map(fmt, src, arch)
    preprocess = _keras_normalization(mapper, arch)
    backbone = tf_bn
  else:
    raise CheckpointError(f"EfficientNet weights in format {fmt!r} are not supported; "
                          "use torchvision, keras or efficientnet-lite")
  spec = {"arch": arch, "head": "classes", "num_classes": mapper.num_classes(), "backbone": {**backbone, **options}}
  return spec, mapper.assemble(spec), preprocess
