"""EfficientNet B0-B7 (Tan & Le) and EfficientNet-Lite0-Lite4 as one parametrised module.

B variants follow torchvision: SiLU, squeeze-excitation (`fc1`/`fc2` 1x1 convs with bias, squeeze =
block input // 4), width/depth multipliers, head = 4 x last stage channels. Lite variants (the TF
`efficientnet_lite_builder`, ported to PyTorch by `efficientnet_lite_pytorch`): no SE, ReLU6, fixed
32-channel stem and 1280-channel head, first and last stage repeats not depth-scaled.
Stochastic depth on block i of n is 0.2 * i / n in training. `padding` and `bn_eps` depend on where
the weights come from (torchvision: 'torch', 1e-5; Keras and Lite: 'tf_same', 1e-3) and are set by
the converter. Layer names: `stem`, `blocks_{i}` (`expand`, `dwconv`, `se`, `project`), `head_conv`.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax

from agejax.models.blocks import ConvBNSettings
from agejax.models.mobilenet import make_divisible, mbconv_features, relu6

# (expand ratio, kernel, first stride, output channels, repeats) of B0; Lite uses the same table.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))

# name: (width multiplier, depth multiplier, dropout, lite); torchvision and the Lite builder.
VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 0.2, False), "efficientnet_b1": (1.0, 1.1, 0.2, False),
    "efficientnet_b2": (1.1, 1.2, 0.3, False), "efficientnet_b3": (1.2, 1.4, 0.3, False),
    "efficientnet_b4": (1.4, 1.8, 0.4, False), "efficientnet_b5": (1.6, 2.2, 0.4, False),
    "efficientnet_b6": (1.8, 2.6, 0.5, False), "efficientnet_b7": (2.0, 3.1, 0.5, False),
    "efficientnet_lite0": (1.0, 1.0, 0.2, True), "efficientnet_lite1": (1.0, 1.1, 0.2, True),
    "efficientnet_lite2": (1.1, 1.2, 0.3, True), "efficientnet_lite3": (1.2, 1.4, 0.3, True),
    "efficientnet_lite4": (1.4, 1.8, 0.3, True),
}

@dataclasses.dataclass(frozen=True)
class Block:
  """One MBConv block: position (stage, index in stage) and its channel counts."""

  stage: int
  index: int
  cin: int
  hidden: int
  cout: int
  kernel: int
  stride: int
  squeeze: int


def efficientnet_layout(
    width_mult: float, depth_mult: float, lite: bool, width: float = 1.0,
) -> tuple[int, list[Block], int]:
  """(stem channels, blocks, head channels) with the reference rounding of channels and repeats."""
  def channels(c: float) -> int:
    return make_divisible(c * width_mult * width)

  cin = make_divisible(32 * width) if lite else channels(32)
  stem = cin
  blocks = []
  for s, (expand, kernel, stride, cout, repeats) in enumerate(STAGES):
    cout = channels(cout)
    if not (lite and s in (0, len(STAGES) - 1)):
      repeats = int(math.ceil(repeats * depth_mult))
    for i in range(repeats):
      hidden = make_divisible(cin * expand) if expand != 1 else cin
      squeeze = 0 if lite else max(1, cin // 4)
      blocks.append(Block(s, i, cin, hidden, cout, kernel, stride if i == 0 else 1, squeeze))
      cin = cout
  head = make_divisible(1280 * width) if lite else 4 * cin
  return stem, blocks, head


class EfficientNet(ConvBNSettings):
  """EfficientNet features: global average pool of the 1x1 head conv, then dropout."""

  width_mult: float = 1.0
  depth_mult: float = 1.0
  lite: bool = False
  width: float = 1.0
  dropout: float = 0.2
  stochastic_depth: float = 0.2

  def layout(self) -> tuple[int, list[Block], int]:
    return efficientnet_layout(self.width_mult, self.depth_mult, self.lite, self.width)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act: Callable[[jax.Array], jax.Array] = relu6 if self.lite else nn.silu
    stem, blocks, head = self.layout()
    fields = [dict(cin=b.cin, hidden=b.hidden, cout=b.cout, kernel=b.kernel, stride=b.stride, squeeze=b.squeeze,
                   drop_rate=self.stochastic_depth * i / len(blocks)) for i, b in enumerate(blocks)]
    return mbconv_features(self, x, train, act, stem, fields, head, self.dropout)


def variant_defaults(arch: str) -> dict:
  """Constructor fields of a named variant with torchvision's (B) or the TF Lite builder's BN/padding."""
  if arch not in VARIANTS:
    raise ValueError(f"unknown EfficientNet variant {arch!r}; known: {sorted(VARIANTS)}")
  width_mult, depth_mult, dropout, lite = VARIANTS[arch]
  fields = dict(width_mult=width_mult, depth_mult=depth_mult, dropout=dropout, lite=lite)
  if lite:
    fields.update(padding="tf_same", bn_eps=1e-3, bn_momentum=0.99)
  elif arch in ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7"):
    fields.update(bn_eps=1e-3, bn_momentum=0.99)  # torchvision's choice for the larger ported models
  return fields


def builder(arch: str) -> Callable[..., EfficientNet]:
  """`builder(arch)(**overrides)` builds that variant; overrides win over the variant defaults."""
  return functools.partial(EfficientNet, **variant_defaults(arch))
