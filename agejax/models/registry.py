"""Architecture registry and the model = backbone + head wrapper.

A model is described by a plain spec (a dict, stored in configs and prior metadata):
  arch        registered backbone name: 'vgg16', 'mobilenet_v2', 'efficientnet_b0'..'b7', 'efficientnet_lite0'..'lite4',
              'wrn16_8' (WideResNet; depth/widen_factor fields), 'dlib_resnet10'
  head        an age head ('dex', 'regression', 'coral', ...; see heads.py) or 'classes'
  num_classes bins / ranks K of an age head (default 101), or the classes of a 'classes' head (1000 ImageNet)
  bin_values / decode / loss_options   age-head options (heads.age_head)
  backbone    keyword arguments of the backbone (width, conv_impl, dropout, ...); conv_impl is a name
              ('lax', 'canonical', 'patches', 'auto') or a per-layer plan {signature_key: impl} (`with_conv_plan`)
  head_init_std / regression_hidden / init_age   head options
Variables are {'params': {'backbone': ..., 'head': ...}} plus 'batch_stats' for BatchNorm models.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from agejax.models.heads import head_module
from agejax.models.layers import Signature, conv_impl_attr, signature_key

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
  kwargs = dict(spec.get("backbone", {}))
  if "conv_impl" in kwargs:  # a plan (a mapping in the spec) becomes the hashable tuple Conv2D takes
    kwargs["conv_impl"] = conv_impl_attr(kwargs["conv_impl"])
  backbone = BACKBONES[arch](**kwargs)
  head = head_module(spec)  # head, num_classes, head_init_std, regression_hidden, init_age (age heads validated)
  return AgeModel(backbone=backbone, head=head, name=None)


def with_conv_plan(spec: Mapping[str, Any], plan: Mapping[Signature, str]) -> dict[str, Any]:
  """`spec` whose backbone computes each convolution as `plan` says ({signature: impl}, e.g. measured by
  `agejax.engine.autotune.plan_model`; 'canonical' for a signature it does not name)."""
  conv_impl = {signature_key(sig): impl for sig, impl in plan.items()}
  conv_impl_attr(conv_impl)  # unknown implementations fail here, naming them
  return {**spec, "backbone": {**dict(spec.get("backbone", {})), "conv_impl": conv_impl}}


def _register_defaults() -> None:
  from agejax.models import vgg
  register_backbone("vgg16", vgg.VGG16)
  from agejax.models import efficientnet, mobilenet
  register_backbone("mobilenet_v2", mobilenet.MobileNetV2)
  for arch in efficientnet.VARIANTS:
    register_backbone(arch, efficientnet.builder(arch))
  from agejax.models import dlib_resnet, wideresnet
  register_backbone("wrn16_8", wideresnet.WideResNet)  # depth / widen_factor fields make the family
  register_backbone("dlib_resnet10", dlib_resnet.DlibResNet)


_register_defaults()
