"""Building blocks shared by the architectures.

`Conv2D` takes an explicit padding convention because ported weights only reproduce their reference
outputs under the convention they were trained with:
  - 'torch': symmetric padding (k-1)//2 * dilation (torchvision, Caffe, the VGG-Face port);
  - 'tf_same': TensorFlow 'SAME' (extra pixel bottom/right on even inputs; Keras, EfficientNet-Lite).
Flax's own 'SAME' equals 'tf_same'; it differs from torch for stride-2 convs on even inputs.

`impl` selects how the convolution is computed:
  - 'lax': `lax.conv_general_dilated` and JAX's own gradient;
  - 'canonical': the same forward, with a hand-written VJP whose two backward convolutions are laid out
    NHWC x HWIO by explicit transposes. JAX's gradient convolutions use other dimension orders, which
    XLA:CPU rewrites into its fast (Eigen) layout at the top level of a program but not inside a loop
    body, where they run through a generic emitter about 5x slower; the engine's steps run in `lax.scan`.
    Depthwise convolutions become a sum of kh*kw shifted, strided slices times per-channel weights
    (XLA:CPU's grouped convolution is ~6x slower at the top level and ~60x inside a loop).
  - 'patches': im2col + matmul; turns into a batched matmul under `jax.vmap` over trials instead of a
    grouped convolution.
All three give the same values (tested); which is fastest depends on backend and shapes (`agejax.bench`).
A per-layer choice is a plan, `((signature_key, impl), ...)` (`agejax.engine.autotune` measures one, the model
spec carries it as `backbone.conv_impl`): each Conv2D looks its own signature up in its own `impl`, 'canonical'
where the plan does not name it. 'auto' (a layer not planned yet) computes as 'canonical' too.
"""

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = Literal["torch", "tf_same", "valid"]
Impl = Literal["lax", "canonical", "patches"]
IMPLS: tuple[Impl, ...] = ("lax", "canonical", "patches")
FALLBACK: Impl = "canonical"
Signature = tuple  # (x_shape, kernel_shape, strides, pads, groups, dtype name)
ConvPlan = tuple[tuple[str, Impl], ...]  # ((signature_key, impl), ...): hashable, so jit caches key on it
ConvImpl = Impl | Literal["auto"] | ConvPlan
_NHWC = ("NHWC", "HWIO", "NHWC")


def signature(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
              pads: Sequence[tuple[int, int]], groups: int, dtype: Any) -> Signature:
  """What a convolution's speed depends on: shapes, strides, pads, groups and compute dtype."""
  return (tuple(x_shape), tuple(kernel_shape), tuple(strides), tuple(tuple(p) for p in pads), int(groups),
          jnp.dtype(dtype).name)


def signature_key(sig: Signature) -> str:
  """A signature as the JSON text that plans (and plan files) are keyed by."""
  return json.dumps(sig)


def signature_from_key(key: str) -> Signature:
  x_shape, k_shape, strides, pads, groups, dtype = json.loads(key)
  return signature(x_shape, k_shape, strides, pads, groups, dtype)


def conv_plan(choices: Mapping[Any, str] | Sequence[Sequence[Any]]) -> ConvPlan:
  """A plan from {signature or signature_key: impl} or (key, impl) pairs (a JSON round trip's lists)."""
  pairs = choices.items() if isinstance(choices, Mapping) else choices
  plan = tuple((k if isinstance(k, str) else signature_key(k), v) for k, v in pairs)
  bad = sorted({v for _, v in plan if v not in IMPLS})
  if bad:
    raise ValueError(f"unknown convolution implementations {bad}; expected {IMPLS}")
  return plan


def conv_impl_attr(value: Any) -> ConvImpl:
  """A spec's `conv_impl` as a Conv2D accepts it: a name, or a plan (a mapping or pairs) as a `ConvPlan`."""
  return value if isinstance(value, str) else conv_plan(value)


def resolve_impl(impl: ConvImpl | Mapping[str, str], sig: Signature) -> Impl:
  """The implementation a convolution of signature `sig` computes with under `impl`."""
  if isinstance(impl, str):
    return FALLBACK if impl == "auto" else impl
  return dict(impl).get(signature_key(sig), FALLBACK)


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
    groups: int = 1, impl: Impl = "lax",
) -> jax.Array:
  """NHWC x HWIO convolution, computed by XLA's conv or by patches + matmul."""
  if impl == "canonical" and groups == 1:
    return _canonical_conv(x, kernel, tuple(strides), tuple(tuple(p) for p in pads))
  if impl == "canonical" and groups == x.shape[-1] == kernel.shape[-1]:
    return depthwise_shifted(x, kernel, strides, pads)
  if impl != "patches" or groups != 1:
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


def depthwise_shifted(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                      pads: Sequence[tuple[int, int]]) -> jax.Array:
  """Depthwise NHWC convolution (kernel (kh, kw, 1, C)) as a sum of shifted strided slices."""
  kh, kw = kernel.shape[:2]
  sy, sx = strides
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho, wo = (xp.shape[1] - kh) // sy + 1, (xp.shape[2] - kw) // sx + 1
  out = None
  for a in range(kh):
    for b in range(kw):
      window = lax.slice(xp, (0, a, b, 0), (xp.shape[0], a + (ho - 1) * sy + 1, b + (wo - 1) * sx + 1, xp.shape[3]),
                         (1, sy, sx, 1))
      term = window * kernel[a, b, 0]
      out = term if out is None else out + term
  return out


def _plain_conv(x, kernel, strides, pads, lhs_dilation=None, rhs_dilation=None):
  return lax.conv_general_dilated(x, kernel, strides, pads, lhs_dilation, rhs_dilation, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                    pads: tuple[tuple[int, int], ...]) -> jax.Array:
  return _plain_conv(x, kernel, strides, pads)


def _canonical_fwd(x, kernel, strides, pads):
  return _plain_conv(x, kernel, strides, pads), (x, kernel)


def _canonical_bwd(strides, pads, res, g):
  x, kernel = res
  spatial, k_sizes, out_sizes = x.shape[1:3], kernel.shape[:2], g.shape[1:3]
  # d/dx: the output gradient, dilated by the stride, convolved with the flipped kernel (in/out swapped).
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  dx_pads = []
  for size, k, out, s, (lo, _) in zip(spatial, k_sizes, out_sizes, strides, pads):
    lo_t = k - 1 - lo
    dx_pads.append((lo_t, size + k - 1 - lo_t - ((out - 1) * s + 1)))
  dx = _plain_conv(g, flipped, (1, 1), dx_pads, lhs_dilation=strides)
  # d/dkernel: batch and channels swap roles: (C, H, W, N) convolved with (Ho, Wo, N, O) -> (C, kh, kw, O).
  dw_pads = [(lo, k - 1 - size - lo + (out - 1) * s + 1)
             for size, k, out, s, (lo, _) in zip(spatial, k_sizes, out_sizes, strides, pads)]
  dw = _plain_conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), (1, 1), dw_pads,
                   rhs_dilation=strides)
  return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(kernel.dtype)


_canonical_conv.defvjp(_canonical_fwd, _canonical_bwd)


class Conv2D(nn.Module):
  """2-D convolution with an explicit padding convention and a selectable implementation (a name or a plan)."""

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
    impl = resolve_impl(self.impl, conv_signature(self, x.shape, x.dtype))
    y = conv_nhwc(x.astype(dtype), kernel.astype(dtype), self.strides, pads, self.groups, impl)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
    return y


def conv_signature(conv: Conv2D, x_shape: Sequence[int], x_dtype: Any) -> Signature:
  """The signature of `conv` applied to an input of this shape and dtype."""
  pads = conv_padding(x_shape[1:3], conv.kernel_size, conv.strides, conv.padding)
  kernel_shape = (*conv.kernel_size, x_shape[-1] // conv.groups, conv.features)
  return signature(x_shape, kernel_shape, conv.strides, pads, conv.groups, conv.dtype or x_dtype)
