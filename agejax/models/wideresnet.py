"""Wide residual networks (Zagoruyko & Komodakis) as trained by yu4u's age-gender-estimation (IMDB-WIKI).

One family, parametrised by `depth` (6n + 4) and `widen_factor` k: a 3x3 stem conv with 16 channels, three
groups of n pre-activation basic blocks with 16k, 32k and 64k channels (the second and third start with
stride 2), a final BatchNorm + ReLU, an average pool (`pool_size`, stride 1, TF 'SAME' padding that does
not count the padded cells) and a flatten. 'wrn16_8' is depth 16, k 8: 64 px input, 16x16x512 = 131,072
features. The heads (yu4u: a 101-bin age softmax and a 2-class gender softmax, dense without bias) are
agejax heads on these features; a port keeps the age head (see agejax/porting/wideresnet.py).

yu4u's basic block, followed exactly because the weights depend on it: when the block changes the channel
count, BatchNorm + ReLU of the input feed both the first 3x3 conv and the 1x1 projection shortcut; otherwise
the shortcut is the raw (not pre-activated) input. Convolutions have no bias and pad like TensorFlow
('tf_same': stride-2 convs pad bottom/right only); BatchNorm epsilon 1e-3 and momentum 0.99 are Keras's.
`bn_train=False` freezes BatchNorm (running statistics used and never updated, even in training).

Stages (`stage_names()`): 'stem', 'block{g}_{i}' (group g = 1..3, block i = 1..n), 'final' (BN + ReLU),
'pool' (average pool + flatten).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax.models.blocks import KerasConvBNSettings, batch_norm, settings
from agejax.models.layers import Conv2D
from agejax.models.stages import stage_range

# Keras' he_normal (yu4u's initialiser); ports overwrite it.
_HE = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
STEM_FEATURES = 16


def wrn_layout(depth: int, widen_factor: int) -> list[tuple[str, int, int, int]]:
  """[(stage name, in channels, out channels, stride)] of the residual blocks."""
  if depth < 4 or (depth - 4) % 6:
    raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
  n = (depth - 4) // 6
  blocks, cin = [], STEM_FEATURES
  for g, (features, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
    cout = features * widen_factor
    for i in range(1, n + 1):
      blocks.append((f"block{g}_{i}", cin, cout, stride if i == 1 else 1))
      cin = cout
  return blocks


class WideBasic(KerasConvBNSettings):
  """yu4u's pre-activation basic block (see the module docstring for the shortcut rule)."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    project = x.shape[-1] != self.features
    if not project and self.stride != 1:
      raise ValueError(f"{self.name}: a stride-{self.stride} block must change the channel count")
    conv = functools.partial(Conv2D, self.features, padding=self.padding, use_bias=False, impl=self.conv_impl,
                             kernel_init=_HE, dtype=self.dtype)
    pre = nn.relu(batch_norm(self, train, "bn1")(x))
    y = conv((3, 3), (self.stride, self.stride), name="conv1")(pre)
    y = nn.relu(batch_norm(self, train, "bn2")(y))
    y = conv((3, 3), name="conv2")(y)
    shortcut = conv((1, 1), (self.stride, self.stride), name="shortcut")(pre) if project else x
    return y + shortcut


class WideResNet(KerasConvBNSettings):
  """WRN-depth-k features (see the module docstring); `__call__` runs stages `start`..`stop`."""

  depth: int = 16
  widen_factor: int = 8
  pool_size: int = 8

  def layout(self) -> list[tuple[str, int, int, int]]:
    return wrn_layout(self.depth, self.widen_factor)

  def stage_names(self) -> tuple[str, ...]:
    return ("stem", *(b[0] for b in self.layout()), "final", "pool")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, start: str | None = None,
               stop: str | None = None) -> jax.Array:
    x = x.astype(self.dtype or jnp.float32)
    blocks = {name: (cout, stride) for name, _, cout, stride in self.layout()}
    for stage in stage_range(self.stage_names(), start, stop):
      if stage == "stem":
        x = Conv2D(STEM_FEATURES, (3, 3), padding=self.padding, use_bias=False, impl=self.conv_impl,
                   kernel_init=_HE, dtype=self.dtype, name="stem")(x)
      elif stage in blocks:
        cout, stride = blocks[stage]
        x = WideBasic(cout, stride, name=stage, **settings(self))(x, train)
      elif stage == "final":
        x = nn.relu(batch_norm(self, train, "final_bn")(x))
      else:  # pool: Keras AveragePooling2D(pool, strides=1, padding='same') averages only the real cells
        k = (self.pool_size, self.pool_size)
        x = nn.avg_pool(x, k, strides=(1, 1), padding="SAME", count_include_pad=False)
        x = x.reshape(x.shape[0], -1)
    return x
