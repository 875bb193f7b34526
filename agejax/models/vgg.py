"""VGG-16 (Simonyan & Zisserman) as used by DEX, VGG-Face and ImageNet priors.

Parameter names follow Caffe (`conv1_1..conv5_3`, `fc6`, `fc7`) so every port maps by name.
The backbone ends at fc7 (ReLU, dropout); the classifier (`fc8`, DEX's `fc8-101`) is the head.
`width` scales every layer's channels for tiny test models; at 224 px fc6 sees 7x7x512 (NHWC flatten).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax.models.layers import Conv2D, ConvImpl

# He init keeps activations alive through 13 ReLU convs when training from scratch (ports overwrite it).
_HE = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


class VGG16(nn.Module):
  """VGG-16 feature extractor through fc7."""

  width: float = 1.0
  fc_dim: int = 4096
  dropout: float = 0.5
  conv_impl: ConvImpl = "lax"
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype or jnp.float32)
    for block, (layers, channels) in enumerate(VGG16_BLOCKS, start=1):
      for layer in range(1, layers + 1):
        features = max(1, int(round(channels * self.width)))
        x = Conv2D(features, (3, 3), padding="torch", impl=self.conv_impl, dtype=self.dtype, kernel_init=_HE,
                   name=f"conv{block}_{layer}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, name=name)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x
