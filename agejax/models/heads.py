"""Output heads and what they mean: DEX age bins, other class sets, and direct regression.

A head kind fixes how outputs become ages and which loss trains them:
  - 'dex': 101 logits for ages 0..100; age = softmax expectation sum_i p_i * i (i from 0, not 1);
    loss = softmax cross-entropy against the rounded age bin (Caffe SoftmaxWithLoss).
  - 'classes': a checkpoint's own classifier (1000 ImageNet classes, 2622 VGG-Face identities);
    it has no age meaning, so it cannot be trained or evaluated for age.
  - 'regression': three dense layers with GELU between, one output in years; loss = |error|.
"""

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

HeadKind = Literal["dex", "classes", "regression"]
DEX_BINS = 101


class ClassifierHead(nn.Module):
  """One dense layer; `init_std` set gives the paper's gaussian init for a new head (std 0.01, bias 0)."""

  num_classes: int
  init_std: float | None = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train
    init = (nn.initializers.normal(self.init_std) if self.init_std is not None
            else nn.initializers.lecun_normal())
    return nn.Dense(self.num_classes, kernel_init=init, name="fc")(features.astype(jnp.float32))


class RegressionHead(nn.Module):
  """Three dense layers with GELU between them, regressing age in years (the transfer report's head)."""

  hidden: tuple[int, int] = (512, 128)
  init_bias: float = 0.0

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = features.astype(jnp.float32)
    x = nn.gelu(nn.Dense(self.hidden[0], name="fc1")(x))
    x = nn.gelu(nn.Dense(self.hidden[1], name="fc2")(x))
    # Starting at a plausible age keeps the first MAE gradients informative.
    return nn.Dense(1, bias_init=nn.initializers.constant(self.init_bias), name="fc3")(x)


def make_head(kind: HeadKind, num_classes: int = DEX_BINS, init_std: float | None = 0.01,
              regression_hidden: tuple[int, int] = (512, 128), init_age: float = 30.0) -> nn.Module:
  """Builds a head module of the given kind."""
  if kind == "dex":
    return ClassifierHead(DEX_BINS, init_std=init_std)
  if kind == "classes":
    return ClassifierHead(num_classes, init_std=init_std)
  if kind == "regression":
    return RegressionHead(tuple(regression_hidden), init_bias=init_age)
  raise ValueError(f"unknown head kind {kind!r}; expected 'dex', 'classes' or 'regression'")


def predict_age(outputs: jax.Array, kind: HeadKind) -> jax.Array:
  """Ages in years from head outputs of shape (..., K)."""
  if kind == "dex":
    probs = jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
    return probs @ jnp.arange(outputs.shape[-1], dtype=jnp.float32)
  if kind == "regression":
    return outputs[..., 0].astype(jnp.float32)
  raise ValueError(f"a {kind!r} head does not predict age; put a 'dex' or 'regression' head on the prior")


def age_loss(outputs: jax.Array, ages: jax.Array, kind: HeadKind) -> jax.Array:
  """Per-example training loss for true ages (float years)."""
  if kind == "dex":
    bins = jnp.clip(jnp.round(ages), 0, outputs.shape[-1] - 1).astype(jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), bins)
  if kind == "regression":
    return jnp.abs(outputs[..., 0].astype(jnp.float32) - ages)
  raise ValueError(f"a {kind!r} head cannot be trained for age; use 'dex' or 'regression'")
