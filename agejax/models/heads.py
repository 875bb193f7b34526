"""Output heads: how head outputs become ages, and the losses that train them.

A head is a Flax output module plus a pure pair over explicit arrays, `loss(outputs (..., N), ages (...))
-> per-example loss (...)` and `decode(outputs) -> ages (...)`, built from a model spec by `age_head(spec)`.
Notation: K bins (ranks) = spec `num_classes` (default 101) with ages v_0 < ... < v_{K-1} = spec `bin_values`
(default 0..K-1; dlib's age net has 81 bins with v_0 = 0.25); y the true age in years; p = softmax(outputs);
b(y) the bin nearest y (default bins: round half to even, clipped to [0, K-1], as Caffe's DEX labels; given
`bin_values`: the nearest, ties to the lower bin). Options come from spec `loss_options` (defaults below).

  dex            K logits; -log p_b(y). Rothe, Timofte & Van Gool, DEX, IJCV 2018.
  dldl           K logits; KL(g || p), g_k = exp(-(v_k - y)^2 / 2 sigma^2) / Z over the bins; sigma = 2.
                 Gao et al., Deep Label Distribution Learning with Label Ambiguity, TIP 2017.
  dldl_v2        dldl + lambda_l1 |sum_k p_k v_k - y|; sigma = 2, lambda_l1 = 1.
                 Gao et al., Age Estimation Using Expectation of Label Distribution Learning, IJCAI 2018.
  mean_variance  -log p_b(y) + lambda_mean (m - y)^2 / 2 + lambda_variance sum_k p_k (v_k - m)^2, m = sum_k p_k v_k;
                 lambda_mean = 0.2, lambda_variance = 0.05 (the paper's). Pan et al., Mean-Variance Loss, CVPR 2018.
  sord           KL(s || p), s = softmax_k(-scale * phi(v_k, y)), phi 'abs' |v_k - y| (default, as FaceBase) or
                 'squared' (v_k - y)^2; scale = 1. Diaz & Marathe, Soft Labels for Ordinal Regression, CVPR 2019.
  coral          K-1 logits z_k = w.x + c_k (one shared weight vector, K-1 biases, initialised (K-1..1)/(K-1) as
                 coral-pytorch); P(r > k) = sigmoid(z_k); loss sum_k BCE(z_k, [r > k]), r = b(y).
                 Cao, Mirjalili & Raschka, Rank Consistent Ordinal Regression, Pattern Recognit. Lett. 2020.
  corn           K-1 logits, sigmoid(z_k) = P(r > k | r > k-1), P(r > k) = prod_{j<=k} sigmoid(z_j); loss
                 sum_{k <= min(r, K-2)} BCE(z_k, [r > k]) (only the tasks whose condition holds).
                 Shi, Cao & Raschka, Rank-Consistent Ordinal Regression Based on Conditional Probabilities, 2023.
  regression     one output in years (dense-GELU-dense-GELU-dense); norm 'l1' |yhat - y| (default) or 'l2' (yhat - y)^2.
  classes        a checkpoint's own classifier (ImageNet, VGG-Face): no age meaning; any age use is an error.

KL is the published soft-label cross-entropy minus the target's entropy: the same gradients, 0 at a perfect fit.
CORAL/CORN sum their binary terms per example, as coral-pytorch's coral_loss does (its corn_loss divides the batch's
sum by the batch's number of (example, task) pairs instead); `mean_over_tasks=True` divides each sum by K-1. Scale
matters under SGD: with 101 ranks and ages 1-80, a new CORAL head starts near 69 nats per example, CORN near 29 and
DEX near ln 101 = 4.6.

Decoding (spec `decode`): 'expectation' sum_k p_k v_k, or 'median' the smallest v_k whose CDF reaches 0.5 (no
interpolation: always a bin age). Default 'expectation', except CORAL/CORN, whose default 'median' is the papers'
rule v[#{k : P(r > k) > 0.5}] (coral-pytorch proba_to_label, corn_label_from_logits). CORAL's rank distribution
takes the sigmoids sorted in decreasing order as P(r > k): that is the model's own whenever its biases are ordered
(as at the optimum), and it keeps both the count above 0.5 and the expected rank sum_k sigmoid(z_k).
All functions compute in float32 from log-softmax / log-sigmoid, have no Python branches on values, and are
jit/vmap-safe; the median is piecewise constant (zero gradient), so train with a loss, not with it.

Calibration (spec `calibrate` = c, years): the head's decoded age a becomes s (a - c) + c + t, two parameters
`scale` s (starting at 1) and `shift` t (starting at 0) of `CalibratedHead`, trained by L1 on the calibrated age.
It starts equal to the uncalibrated head. With the inner head frozen it is the cheapest adaptation of a prior to a
new dataset: it can stretch or shrink the predictions around c and move them, not change their order. A calibrated head
predicts one age (its outputs are (..., 1)), so it has no distribution over the bins.
"""

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from agejax.errors import ConfigError

HeadKind = Literal["dex", "dldl", "dldl_v2", "mean_variance", "sord", "coral", "corn", "regression", "classes"]
DEX_BINS = 101
SOFTMAX_KINDS = ("dex", "dldl", "dldl_v2", "mean_variance", "sord")  # K logits, a distribution over the bins
ORDINAL_KINDS = ("coral", "corn")  # K-1 binary logits over K ranks
AGE_KINDS = SOFTMAX_KINDS + ORDINAL_KINDS + ("regression",)
HEAD_KINDS = AGE_KINDS + ("classes",)
DECODERS = ("expectation", "median")

# Per-head `loss_options` and their defaults (the published values; see the module docstring).
LOSS_OPTIONS: dict[str, dict[str, Any]] = {
    "dex": {},
    "dldl": {"sigma": 2.0},
    "dldl_v2": {"sigma": 2.0, "lambda_l1": 1.0},
    "mean_variance": {"lambda_mean": 0.2, "lambda_variance": 0.05},
    "sord": {"phi": "abs", "scale": 1.0},
    "coral": {"mean_over_tasks": False},
    "corn": {"mean_over_tasks": False},
    "regression": {"norm": "l1"},
}
_CHOICES = {"phi": ("abs", "squared"), "norm": ("l1", "l2"), "mean_over_tasks": (False, True)}
_POSITIVE = ("sigma", "scale")  # the rest of the numeric options only need to be >= 0


# ---------------------------------------------------------------------------------------------------- modules

def _kernel_init(std: float | None) -> Callable:
  """The paper's gaussian init for a new head (std given), else LeCun normal."""
  return nn.initializers.normal(std) if std is not None else nn.initializers.lecun_normal()


class ClassifierHead(nn.Module):
  """One dense layer; `init_std` set gives the paper's gaussian init for a new head (std 0.01, bias 0)."""

  num_classes: int
  init_std: float | None = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train
    return nn.Dense(self.num_classes, kernel_init=_kernel_init(self.init_std), name="fc")(features.astype(jnp.float32))


class CoralHead(nn.Module):
  """CORAL's output layer: one shared weight vector and K-1 biases, so K-1 logits w.x + c_k.

  The biases start at (K-1, ..., 1) / (K-1), coral-pytorch's `preinit_bias`: ordered, hence rank-consistent.
  """

  num_ranks: int
  init_std: float | None = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train
    dense = nn.Dense(1, use_bias=False, kernel_init=_kernel_init(self.init_std), name="fc")
    score = dense(features.astype(jnp.float32))
    k = self.num_ranks - 1
    bias = self.param("bias", lambda _, shape: jnp.arange(k, 0, -1, dtype=jnp.float32) / k, (k,))
    return score + bias


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


class CalibratedHead(nn.Module):
  """`inner`'s decoded age (as `age` decodes it) calibrated to s (a - centre) + centre + t; outputs (..., 1)."""

  inner: nn.Module
  age: "AgeHead"
  centre: float

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    predicted = self.age.decode(self.inner(features, train=train))
    scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
    shift = self.param("shift", nn.initializers.zeros, (), jnp.float32)
    return (scale * (predicted - self.centre) + self.centre + shift)[..., None]


def _unknown_kind(kind: Any) -> ConfigError:
  return ConfigError(f"unknown head kind {kind!r}; expected one of {', '.join(HEAD_KINDS)}")


def make_head(kind: HeadKind, num_classes: int = DEX_BINS, init_std: float | None = 0.01,
              regression_hidden: tuple[int, int] = (512, 128), init_age: float = 30.0) -> nn.Module:
  """The Flax output module of a head kind: K logits (softmax kinds, 'classes'), K-1 (ordinal), 1 (regression)."""
  if kind in SOFTMAX_KINDS or kind == "classes":
    return ClassifierHead(int(num_classes), init_std=init_std)
  if kind == "coral":
    return CoralHead(int(num_classes), init_std=init_std)
  if kind == "corn":
    return ClassifierHead(int(num_classes) - 1, init_std=init_std)
  if kind == "regression":
    return RegressionHead(tuple(regression_hidden), init_bias=init_age)
  raise _unknown_kind(kind)


def head_module(spec: Mapping[str, Any]) -> nn.Module:
  """The head module a model spec describes (fields `head`, `num_classes`, `head_init_std`, `regression_hidden`,
  `init_age`); an age head's spec is validated by `age_head` first, so a bad field fails at build time."""
  kind = spec.get("head", "dex")
  if kind in AGE_KINDS:
    head = age_head(spec)
    if head.calibration is not None:
      inner = _uncalibrated(spec)
      return CalibratedHead(head_module(inner), age_head(inner), head.calibration)
  return make_head(kind, num_classes=spec.get("num_classes", DEX_BINS), init_std=spec.get("head_init_std", 0.01),
                   regression_hidden=tuple(spec.get("regression_hidden", (512, 128))),
                   init_age=spec.get("init_age", 30.0))


# ------------------------------------------------------------------------------------ pure pieces over arrays

def nearest_bin(ages: jax.Array, bins: jax.Array, default_bins: bool) -> jax.Array:
  """Index (int32, shape of `ages`) of the bin nearest each age; `default_bins` (bins 0..K-1) rounds as DEX."""
  ages = jnp.asarray(ages, jnp.float32)
  if default_bins:
    return jnp.clip(jnp.round(ages), 0, bins.shape[-1] - 1).astype(jnp.int32)
  return jnp.argmin(jnp.abs(ages[..., None] - bins), axis=-1).astype(jnp.int32)


def rank_levels(ranks: jax.Array, num_ranks: int) -> jax.Array:
  """Extended binary labels [r > k] for k = 0..K-2, shape (..., K-1) (coral-pytorch levels_from_labelbatch)."""
  return (jnp.asarray(ranks)[..., None] > jnp.arange(num_ranks - 1)).astype(jnp.float32)


def _kl_to_target(log_target: jax.Array, logits: jax.Array) -> jax.Array:
  """KL(target || softmax(logits)) over the last axis, with the target given as log-probabilities."""
  target = jnp.exp(log_target)
  return jnp.sum(target * (log_target - jax.nn.log_softmax(logits, axis=-1)), axis=-1)


def _binary_terms(logits: jax.Array, levels: jax.Array) -> jax.Array:
  """Per-task binary cross-entropy -[l log s(z) + (1 - l) log(1 - s(z))], log(1 - s(z)) = log s(z) - z."""
  log_s = jax.nn.log_sigmoid(logits)
  return -(levels * log_s + (1.0 - levels) * (log_s - logits))


def ordinal_survival(outputs: jax.Array, kind: str) -> jax.Array:
  """P(rank > k) for k = 0..K-2 from CORAL/CORN logits (..., K-1), non-increasing in k."""
  outputs = outputs.astype(jnp.float32)
  if kind == "corn":
    return jnp.exp(jnp.cumsum(jax.nn.log_sigmoid(outputs), axis=-1))  # product of the conditional probabilities
  return -jnp.sort(-jax.nn.sigmoid(outputs), axis=-1)  # CORAL: the sigmoids in decreasing order


def survival_to_probs(survival: jax.Array) -> jax.Array:
  """P(rank = k), k = 0..K-1, from P(rank > k), k = 0..K-2."""
  ones = jnp.ones(survival.shape[:-1] + (1,), survival.dtype)
  return -jnp.diff(jnp.concatenate([ones, survival, jnp.zeros_like(ones)], axis=-1), axis=-1)


def median_bin(probs: jax.Array, bins: jax.Array) -> jax.Array:
  """The smallest bin age whose CDF reaches 0.5 (no interpolation)."""
  idx = jnp.sum(jnp.cumsum(probs, axis=-1) < 0.5, axis=-1)
  return bins[jnp.minimum(idx, bins.shape[-1] - 1)]


# -------------------------------------------------------------------------------------------------- the head

@dataclasses.dataclass(frozen=True)
class AgeHead:
  """An age head resolved from a spec: hashable and comparable by value, so it can be a static jit argument.

  `bin_values` None means the default bins 0..K-1; `options` holds every loss option of the kind, defaults filled;
  `calibration` is the centre of a calibrated head (None: not calibrated), whose one output is the age.
  """

  kind: str
  num_outputs: int
  num_classes: int = DEX_BINS
  bin_values: tuple[float, ...] | None = None
  decoding: str = "expectation"
  options: tuple[tuple[str, Any], ...] = ()
  calibration: float | None = None

  @property
  def has_distribution(self) -> bool:
    """Whether the outputs are a distribution over the bin ages (not for 'regression' or a calibrated head)."""
    return self.kind != "regression" and self.calibration is None

  @property
  def bins(self) -> jax.Array:
    """The K bin (rank) ages, float32."""
    if self.bin_values is None:
      return jnp.arange(self.num_classes, dtype=jnp.float32)
    return jnp.asarray(self.bin_values, jnp.float32)

  def option(self, name: str) -> Any:
    return dict(self.options)[name]

  def loss(self, outputs: jax.Array, ages: jax.Array) -> jax.Array:
    """Per-example training loss (...) for head outputs (..., num_outputs) and true ages (...) in years."""
    if self.calibration is not None:  # L1 on the calibrated age
      return jnp.abs(outputs[..., 0].astype(jnp.float32) - jnp.asarray(ages, jnp.float32))
    return _LOSSES[self.kind](self, outputs.astype(jnp.float32), jnp.asarray(ages, jnp.float32))

  def decode(self, outputs: jax.Array) -> jax.Array:
    """Predicted ages (...) in years."""
    outputs = outputs.astype(jnp.float32)
    if self.kind == "regression" or self.calibration is not None:
      return outputs[..., 0]
    if self.kind in ORDINAL_KINDS:
      survival = ordinal_survival(outputs, self.kind)
      bins = self.bins
      if self.decoding == "median":  # the papers' count rule, exactly (no float round trip through a CDF)
        return bins[jnp.sum(survival > 0.5, axis=-1)]
      return bins[0] + survival @ jnp.diff(bins)
    probs = jax.nn.softmax(outputs, axis=-1)
    if self.decoding == "median":
      return median_bin(probs, self.bins)
    return probs @ self.bins

  def distribution(self, outputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(probabilities (..., K) over the bin ages, the bin ages (K,))."""
    if self.kind == "regression":
      raise ConfigError("a 'regression' head predicts one age, not a distribution over age bins")
    if self.calibration is not None:
      raise ConfigError("a calibrated head predicts one age, not a distribution over age bins")
    outputs = outputs.astype(jnp.float32)
    if self.kind in ORDINAL_KINDS:
      return survival_to_probs(ordinal_survival(outputs, self.kind)), self.bins
    return jax.nn.softmax(outputs, axis=-1), self.bins


def _target_bin(head: AgeHead, ages: jax.Array) -> jax.Array:
  return nearest_bin(ages, head.bins, head.bin_values is None)


def _dex_loss(head: AgeHead, outputs: jax.Array, ages: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(outputs, _target_bin(head, ages))


def _dldl_loss(head: AgeHead, outputs: jax.Array, ages: jax.Array) -> jax.Array:
  sigma = head.option("sigma")
  log_target = jax.nn.log_softmax(-jnp.square(head.bins - ages[..., None]) / (2.0 * sigma ** 2), axis=-1)
  return _kl_to_target(log_target, outputs)


def _expected_age(head: AgeHead, outputs: jax.Array) -> jax.Array:
  return jax.nn.softmax(outputs, axis=-1) @ head.bins


def _dldl_v2_loss(head: AgeHead, outputs: jax.Array, ages: jax.Array) -> jax.Array:
  return _dldl_loss(head, outputs, ages) + head.option("lambda_l1") * jnp.abs(_expected_age(head, outputs) - ages)


def _mean_variance_loss(head: AgeHead, outputs: jax.Array, ages: jax.Array) -> jax.Array:
  probs = jax.nn.softmax(outputs, axis=-1)
  mean = probs @ head.bins
  variance = jnp.sum(probs * jnp.square(head.bins - mean[..., None]), axis=-1)
  return (_dex_loss(head, outputs, ages) + head.option("lambda_mean") * 0.5 * jnp.square(mean - ages)
          + head.option("lambda_variance") * variance)


def _sord_loss(head: AgeHead, outputs: jax.Array, ages: jax.Array) -> jax.Array:
  dist = jnp.abs(head.bins - ages[..., None])
  phi = jnp.square(dist) if head.option("phi") == "squared" else dist
  return _kl_to_target(jax.nn.log_softmax(-head.option("scale") * phi, axis=-1), outputs)


def _ordinal_scale(head: AgeHead) -> float:
  return 1.0 / head.num_outputs if head.option("mean_over_tasks") else 1.0


def _coral_loss(head: AgeHead, outputs: jax.Array, ages: jax.Array) -> jax.Array:
  levels = rank_levels(_target_bin(head, ages), head.num_classes)
  return _ordinal_scale(head) * jnp.sum(_binary_terms(outputs, levels), axis=-1)


def _corn_loss(head: AgeHead, outputs: jax.Array, ages: jax.Array) -> jax.Array:
  ranks = _target_bin(head, ages)
  # Task k is trained only on examples with rank > k-1, i.e. k <= rank.
  in_task = (jnp.arange(head.num_outputs) <= ranks[..., None]).astype(jnp.float32)
  terms = _binary_terms(outputs, rank_levels(ranks, head.num_classes))
  return _ordinal_scale(head) * jnp.sum(in_task * terms, axis=-1)


def _regression_loss(head: AgeHead, outputs: jax.Array, ages: jax.Array) -> jax.Array:
  err = outputs[..., 0] - ages
  return jnp.square(err) if head.option("norm") == "l2" else jnp.abs(err)


_LOSSES: dict[str, Callable[[AgeHead, jax.Array, jax.Array], jax.Array]] = {
    "dex": _dex_loss, "dldl": _dldl_loss, "dldl_v2": _dldl_v2_loss, "mean_variance": _mean_variance_loss,
    "sord": _sord_loss, "coral": _coral_loss, "corn": _corn_loss, "regression": _regression_loss,
}


# ------------------------------------------------------------------------------------------ from a model spec

def _no_age(kind: str, num_classes: Any = None) -> ConfigError:
  what = f"a checkpoint's own {num_classes}-way classifier" if num_classes else "a checkpoint's own classifier"
  return ConfigError(f"a {kind!r} head ({what}) does not predict age; put an age head on it "
                     f"(head='new' with one of {', '.join(AGE_KINDS)})")


def _loss_options(kind: str, given: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  known = LOSS_OPTIONS[kind]
  given = dict(given or {})
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ConfigError(f"loss_options.{unknown[0]} is not an option of a {kind!r} head; its options: "
                      f"{', '.join(known) or 'none'}")
  out = {**known, **given}
  for name, value in out.items():
    if name in _CHOICES:
      if value not in _CHOICES[name] or (name == "mean_over_tasks" and not isinstance(value, bool)):
        raise ConfigError(f"loss_options.{name} of a {kind!r} head must be one of {_CHOICES[name]}, got {value!r}")
      continue
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0 \
        or (name in _POSITIVE and value == 0):
      bound = "> 0" if name in _POSITIVE else ">= 0"
      raise ConfigError(f"loss_options.{name} of a {kind!r} head must be a finite number {bound}, got {value!r}")
    out[name] = float(value)
  return tuple(sorted(out.items()))


def _bin_values(values: Any, num_classes: int, kind: str) -> tuple[float, ...] | None:
  if values is None:
    return None
  try:
    values = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ConfigError(f"bin_values of a {kind!r} head must be a list of {num_classes} numbers, got {values!r}") \
        from None
  if len(values) != num_classes:
    raise ConfigError(f"bin_values of a {kind!r} head has {len(values)} values but num_classes is {num_classes}")
  if not all(math.isfinite(v) for v in values) or any(b <= a for a, b in zip(values, values[1:])):
    raise ConfigError(f"bin_values of a {kind!r} head must be finite and strictly increasing, got {values}")
  if values == tuple(float(i) for i in range(num_classes)):
    return None  # the default bins: one code path, so the same targets as an unset field
  return values


def _uncalibrated(spec: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in spec.items() if k != "calibrate"}


def age_head(spec: Mapping[str, Any]) -> AgeHead:
  """The age head a model spec describes: fields `head` (kind, default 'dex'), `num_classes` (bins or ranks K,
  default 101; unused by 'regression'), `bin_values` (K increasing ages, default 0..K-1), `decode` ('expectation'
  or 'median'; default 'median' for coral/corn, else 'expectation'), `loss_options` (see LOSS_OPTIONS) and
  `calibrate` (the centre of an output calibration in years; absent or None: none)."""
  centre = spec.get("calibrate")
  if centre is not None:
    if isinstance(centre, bool) or not isinstance(centre, numbers.Real) or not math.isfinite(centre):
      raise ConfigError(f"calibrate must be the calibration's centre in years (a finite number), got {centre!r}")
    return dataclasses.replace(age_head(_uncalibrated(spec)), num_outputs=1, calibration=float(centre))
  kind = spec.get("head", "dex")
  if kind == "classes":
    raise _no_age(kind, spec.get("num_classes"))
  if kind not in AGE_KINDS:
    raise _unknown_kind(kind)
  options = _loss_options(kind, spec.get("loss_options"))
  decoding = spec.get("decode")
  if kind == "regression":
    if decoding not in (None, "expectation"):
      raise ConfigError(f"decode={decoding!r} needs a distribution over ages; a 'regression' head predicts one age")
    return AgeHead(kind, 1, 1, None, "expectation", options)
  num_classes = spec.get("num_classes", DEX_BINS)
  if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
    raise ConfigError(f"num_classes of a {kind!r} head must be an integer >= 2, got {num_classes!r}")
  num_classes = int(num_classes)
  if decoding is None:
    decoding = "median" if kind in ORDINAL_KINDS else "expectation"
  if decoding not in DECODERS:
    raise ConfigError(f"decode must be one of {', '.join(DECODERS)}, got {decoding!r}")
  num_outputs = num_classes - 1 if kind in ORDINAL_KINDS else num_classes
  return AgeHead(kind, num_outputs, num_classes, _bin_values(spec.get("bin_values"), num_classes, kind), decoding,
                 options)


def age_distribution(outputs: jax.Array, spec: Mapping[str, Any] | AgeHead) -> tuple[jax.Array, jax.Array]:
  """(probabilities (..., K) over the bin ages, bin ages (K,)) of a distribution head (softmax kinds; CORAL/CORN
  as a distribution over ranks); e.g. the SD of the age is sqrt(sum p (v - sum p v)^2)."""
  head = spec if isinstance(spec, AgeHead) else age_head(spec)
  return head.distribution(outputs)


# ------------------------------------------------------------- the string API (an AgeHead is taken as well)

def _legacy_head(kind: str | AgeHead, outputs: jax.Array) -> AgeHead:
  if isinstance(kind, AgeHead):  # a head resolved from a spec: its bins, decoder and options as given
    return kind
  if kind == "classes":
    raise _no_age(kind, outputs.shape[-1])
  if kind not in AGE_KINDS:
    raise _unknown_kind(kind)
  num_classes = outputs.shape[-1] + (1 if kind in ORDINAL_KINDS else 0)
  return age_head({"head": kind, "num_classes": num_classes})


def predict_age(outputs: jax.Array, kind: HeadKind | AgeHead) -> jax.Array:
  """Ages in years from head outputs (..., N) of a kind with its default options, K taken from N (or of an
  `AgeHead`, as resolved)."""
  return _legacy_head(kind, outputs).decode(outputs)


def age_loss(outputs: jax.Array, ages: jax.Array, kind: HeadKind | AgeHead) -> jax.Array:
  """Per-example training loss for true ages (float years), default options, K taken from the outputs (or
  an `AgeHead`'s own)."""
  return _legacy_head(kind, outputs).loss(outputs, ages)
