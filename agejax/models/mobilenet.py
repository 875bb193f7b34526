"""MobileNetV2 (Sandler et al.) and the conv + BatchNorm + activation unit shared with EfficientNet.

One module serves torchvision and Keras weights: `padding` and `bn_eps` are fields the converter sets
('torch' / 1e-5 for torchvision; 'tf_same' / 1e-3 for Keras, whose ZeroPadding2D + 'valid' stride-2
convs equal TF 'SAME'). `bn_momentum` is Flax's (1 - torch momentum). `bn_train=False` freezes
BatchNorm: running statistics are used and left untouched even in training (`agejax.models.blocks`).
Layer names: `stem`, `blocks_{i}` (`expand`, `dwconv`, `project`), `head_conv`; each has `conv` and `bn`.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax.models.blocks import ConvBNSettings, batch_norm, settings
from agejax.models.layers import Conv2D, ConvImpl

ModuleDef = Any

# (expand ratio, output channels, repeats, first stride) of torchvision's and Keras's MobileNetV2.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of `divisor`, never more than 10% down (TF's rule)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 6.0)


class ConvBN(ConvBNSettings):
  """Conv (no bias) + BatchNorm + optional activation; `depthwise` makes one group per channel."""

  features: int
  kernel: int = 1
  stride: int = 1
  depthwise: bool = False
  act: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    groups = x.shape[-1] if self.depthwise else 1
    x = Conv2D(self.features, (self.kernel, self.kernel), (self.stride, self.stride), padding=self.padding,
               groups=groups, use_bias=False, impl=self.conv_impl,
               dtype=self.dtype, name="conv")(x)
    x = batch_norm(self, train, "bn")(x)
    return self.act(x) if self.act is not None else x


def mobilenet_v2_layout(
    width_mult: float = 1.0, width: float = 1.0,
) -> tuple[int, list[tuple[int, int, int, int]], int]:
  """(stem channels, [(in, hidden, out, stride) per block], head channels) as torchvision rounds them."""
  w = width_mult * width
  cin = make_divisible(32 * w)
  stem = cin
  blocks = []
  for expand, cout, repeats, stride in MOBILENET_V2_STAGES:
    cout = make_divisible(cout * w)
    for i in range(repeats):
      blocks.append((cin, int(round(cin * expand)), cout, stride if i == 0 else 1))
      cin = cout
  head = make_divisible(1280 * max(1.0, width_mult) * width)
  return stem, blocks, head


class MBConv(nn.Module):
  """Inverted residual: expand 1x1 (when hidden != in), depthwise k x k, optional squeeze-excitation,
  linear project 1x1; identity shortcut with stochastic depth `drop_rate` when shapes allow."""

  cin: int
  hidden: int
  cout: int
  kernel: int
  stride: int
  unit: ModuleDef
  act: Callable[[jax.Array], jax.Array] = relu6
  squeeze: int = 0
  drop_rate: float = 0.0
  conv_impl: ConvImpl = "lax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = x
    if self.hidden != self.cin:
      y = self.unit(self.hidden, act=self.act, name="expand")(y, train)
    y = self.unit(self.hidden, self.kernel, self.stride, depthwise=True, act=self.act, name="dwconv")(y, train)
    if self.squeeze:
      y = SqueezeExcite(self.squeeze, self.act, self.conv_impl, name="se")(y)
    y = self.unit(self.cout, act=None, name="project")(y, train)
    if self.stride != 1 or self.cin != self.cout:
      return y
    # Stochastic depth: drop the whole residual branch per example, rescaled by 1/(1 - rate).
    y = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train or self.drop_rate == 0)(y)
    return x + y


class SqueezeExcite(nn.Module):
  """Channel gating: mean pool, 1x1 conv `fc1` + act, 1x1 conv `fc2` + sigmoid, scale (both convs with bias)."""

  squeeze: int
  act: Callable[[jax.Array], jax.Array]
  conv_impl: ConvImpl = "lax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.act(Conv2D(self.squeeze, (1, 1), padding="valid", impl=self.conv_impl, dtype=x.dtype, name="fc1")(s))
    s = Conv2D(x.shape[-1], (1, 1), padding="valid", impl=self.conv_impl, dtype=x.dtype, name="fc2")(s)
    return x * jax.nn.sigmoid(s)


def conv_bn_unit(module: ConvBNSettings) -> ModuleDef:
  """ConvBN with a backbone's padding, BatchNorm and conv settings filled in."""
  return functools.partial(ConvBN, **settings(module))


def mbconv_features(module: ConvBNSettings, x: jax.Array, train: bool, act: Callable[[jax.Array], jax.Array],
                    stem: int, blocks: Sequence[Mapping[str, Any]], head: int, dropout: float) -> jax.Array:
  """The MobileNetV2 / EfficientNet body, built under `module` (call it in its compact method): 3x3 stride-2
  `stem` ConvBN, one MBConv per `blocks` entry (its fields but unit/act/conv_impl), 1x1 `head` ConvBN,
  global average pool, dropout."""
  unit = conv_bn_unit(module)
  x = unit(stem, 3, 2, act=act, name="stem")(x.astype(module.dtype or jnp.float32), train)
  for i, fields in enumerate(blocks):
    x = MBConv(**fields, unit=unit, act=act, conv_impl=module.conv_impl, name=f"blocks_{i}")(x, train)
  x = unit(head, act=act, name="head_conv")(x, train)
  x = jnp.mean(x, axis=(1, 2))
  return nn.Dropout(dropout, deterministic=not train)(x)


class MobileNetV2(ConvBNSettings):
  """MobileNetV2 features: global average pool of the 1x1 head conv, then dropout."""

  width_mult: float = 1.0
  width: float = 1.0
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    stem, blocks, head = mobilenet_v2_layout(self.width_mult, self.width)
    fields = [dict(cin=cin, hidden=hidden, cout=cout, kernel=3, stride=stride) for cin, hidden, cout, stride in blocks]
    return mbconv_features(self, x, train, relu6, stem, fields, head, self.dropout)
