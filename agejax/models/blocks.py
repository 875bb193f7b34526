"""Conv padding and BatchNorm settings shared by the BatchNorm backbones (MobileNetV2, EfficientNet, WRN).

`ConvBNSettings` holds the fields every such module takes, keyword-only so that each subclass keeps its own
positional fields first (`WideResNet(16, 8)`, `ConvBN(features, kernel, stride)`); the defaults are
torchvision's (symmetric padding, BN epsilon 1e-5, Flax momentum 0.9), `KerasConvBNSettings` has Keras's
(TF 'SAME' padding, 1e-3, 0.99). `bn_train=False` freezes BatchNorm: running statistics are used and left
untouched even in training.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from agejax.models.layers import ConvImpl, Padding


class ConvBNSettings(nn.Module, kw_only=True):
  """Padding convention, BatchNorm epsilon / momentum / trainability, conv implementation and dtype."""

  padding: Padding = "torch"
  bn_eps: float = 1e-5
  bn_momentum: float = 0.9
  bn_train: bool = True
  conv_impl: ConvImpl = "lax"
  dtype: jnp.dtype | None = None


class KerasConvBNSettings(ConvBNSettings, kw_only=True):
  """`ConvBNSettings` with Keras's defaults."""

  padding: Padding = "tf_same"
  bn_eps: float = 1e-3
  bn_momentum: float = 0.99


SETTINGS = tuple(f.name for f in dataclasses.fields(ConvBNSettings) if f.name not in ("parent", "name"))


def settings(module: ConvBNSettings) -> dict[str, Any]:
  """A module's `ConvBNSettings` fields, to hand on to the units it builds."""
  return {name: getattr(module, name) for name in SETTINGS}


def batch_norm(module: ConvBNSettings, train: bool, name: str) -> nn.BatchNorm:
  """The BatchNorm layer `name` under `module`'s settings (call it inside `module`'s compact method)."""
  return nn.BatchNorm(use_running_average=not (train and module.bn_train), momentum=module.bn_momentum,
                      epsilon=module.bn_eps, dtype=module.dtype, name=name)
