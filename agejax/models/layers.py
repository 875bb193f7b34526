"""Building blocks shared by the architectures.

`Conv2D` takes an explicit padding convention because ported weights only reproduce their reference
outputs under the convention they were trained with:
  - 'torch': symmetric padding (k-1)//2 * dilation (torchvision, Caffe, the VGG-Face port);
  - 'tf_same': TensorFlow 'SAME' (extra pixel bottom/right on even inputs; Keras, EfficientNet-Lite).
Flax's own 'SAME' equals 'tf_same'; it differs from torch for stride-2 convs on even inputs.

`impl` selects how the convolution is computed; 'patches' (im2col + matmul) turns into a batched
matmul under `jax.vmap` over trials instead of a grouped convolution, which XLA:CPU runs much faster.
"""

from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = Literal["torch", "tf_same", "valid"]
ConvImpl = Literal["lax", "patches"]


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
  """TF 'SAME' padding for one spatial dim: total split with the extra pixel at the end."""
  eff_k = (k - 1) * dilation + 1
  out = -(-size // stride)
  total = max((out - 1) * stride + eff_k - size, 0)
  return total // 2, total - total // 2


def conv_padding(
    spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], padding: Padding,
    dilation: int = 1,
) -> list[tuple[int, int]]:
  """Explicit (lo, hi) pads per spatial dim for a padding convention."""
  if padding == "valid":
    return [(0, 0)] * len(kernel)
  if padding == "torch":
    return [((k - 1) // 2 * dilation,) * 2 for k in kernel]
  if padding == "tf_same":
    return [_same_pads(s, k, st, dilation) for s, k, st in zip(spatial, kernel, strides, strict=False)]
  raise ValueError(f"unknown padding convention {padding!r}")


def conv_nhwc(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads: Sequence[tuple[int, int]],
    groups: int = 1, impl: ConvImpl = "lax",
) -> jax.Array:
  """NHWC x HWIO convolution, computed by XLA's conv or by patches + matmul."""
  if impl == "lax" or groups != 1:
    return lax.conv_general_dilated(
        x, kernel, window_strides=tuple(strides), padding=tuple(pads),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  kh, kw, cin, cout = kernel.shape
  if (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and all(p == (0, 0) for p in pads):
    return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0])
  patches = lax.conv_general_dilated_patches(
      x, (kh, kw), tuple(strides), tuple(pads), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Patch features come out channel-major: (cin, kh, kw).
  w = kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)
  return jnp.einsum("nhwk,ko->nhwo", patches, w)


class Conv2D(nn.Module):
  """2-D convolution with an explicit padding convention and a selectable implementation."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Padding = "torch"
  groups: int = 1
  use_bias: bool = True
  impl: ConvImpl = "lax"
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    if cin % self.groups:
      raise ValueError(f"{self.name}: {cin} input channels not divisible by {self.groups} groups")
    kernel = self.param(
        "kernel", self.kernel_init, (*self.kernel_size, cin // self.groups, self.features))
    pads = conv_padding(x.shape[1:3], self.kernel_size, self.strides, self.padding)
    dtype = self.dtype or x.dtype
    y = conv_nhwc(x.astype(dtype), kernel.astype(dtype), self.strides, pads, self.groups, self.impl)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
    return y
