"""Architecture registry and the model = backbone + head wrapper.

A model is described by a plain spec (a dict, stored in configs and prior metadata):
  arch        registered backbone name: 'vgg16', 'mobilenet_v2', 'efficientnet_b0'..'b7', 'efficientnet_lite0'..'lite4'
  head        'dex' | 'classes' | 'regression' (see heads.py)
  num_classes classes of a 'classes' head (1000 ImageNet, 2622 VGG-Face)
  backbone    keyword arguments of the backbone (width, conv_impl, dropout, ...)
  head_init_std / regression_hidden / init_age   head options
Variables are {'params': {'backbone': ..., 'head': ...}} plus 'batch_stats' for BatchNorm models.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from agejax.models.heads import make_head

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str, builder: Callable[..., nn.Module]) -> None:
  """Makes `builder(**kwargs)` available as architecture `name`."""
  BACKBONES[name] = builder


class AgeModel(nn.Module):
  """Backbone features followed by a head; `train` switches dropout and BatchNorm statistics."""

  backbone: nn.Module
  head: nn.Module

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.backbone(x, train=train), train=train)


def build_model(spec: Mapping[str, Any]) -> AgeModel:
  """Builds the Flax module a model spec describes."""
  arch = spec["arch"]
  if arch not in BACKBONES:
    raise ValueError(f"unknown arch {arch!r}; known: {sorted(BACKBONES)}")
  backbone = BACKBONES[arch](**dict(spec.get("backbone", {})))
  head = make_head(
      spec.get("head", "dex"), num_classes=spec.get("num_classes", 101),
      init_std=spec.get("head_init_std", 0.01),
      regression_hidden=tuple(spec.get("regression_hidden", (512, 128))),
      init_age=spec.get("init_age", 30.0))
  return AgeModel(backbone=backbone, head=head, name=None)


def _register_defaults() -> None:
  from agejax.models import vgg
  register_backbone("vgg16", vgg.VGG16)
  from agejax.models import efficientnet, mobilenet
  register_backbone("mobilenet_v2", mobilenet.MobileNetV2)
  for arch in efficientnet.VARIANTS:
    register_backbone(arch, efficientnet.builder(arch))


_register_defaults()
