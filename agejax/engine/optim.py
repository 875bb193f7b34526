"""Optimisers with the paper's semantics, as optax `GradientTransformation`s.

Caffe SGD (the paper's solver), per parameter with learning-rate and decay multipliers:
  v <- momentum * v + lr * lr_mult * (g + weight_decay * decay_mult * w);   w <- w - v
  lr = base_lr * gamma ** floor(iter / stepsize)          (lr_policy "step")
Multipliers come from ordered (regex, lr_mult, decay_mult) rules matched against parameter paths
like 'backbone/fc6/kernel'; the first match wins, so the authors' prototxt (conv weights x1/x1,
biases x2/x0, fc layers x10/x1 and x20/x0) is a list of four rules in the config.

Adam (the transfer report) is optax's `adamw`, its updates scaled by the same rules' lr multipliers.

Both are `optax.partition`s: parameters with lr multiplier 0 get `optax.set_to_zero` (no update, no optimiser
state: a frozen part), the others the optimiser, its per-parameter factors applied per multiplier group. The
step and the solver's step size are traced values (one compiled program serves every size), injected as
hyperparameters (`optax.inject_hyperparams`) that the training step sets before each update (`with_step`).
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

Rule = tuple[str, float, float]

# The authors' prototxt (docs/protocol.md §1, the DEX model and its solver).
CAFFE_VGG_RULES: tuple[Rule, ...] = (
    (r"(^|/)fc[^/]*/kernel$", 10.0, 1.0),
    (r"(^|/)fc[^/]*/bias$", 20.0, 0.0),
    (r"/kernel$", 1.0, 1.0),
    (r"/bias$", 2.0, 0.0),
)
UNIFORM_RULES: tuple[Rule, ...] = ((r".*", 1.0, 1.0),)
# What an `optim` section that leaves a field out gets, per solver (base_config's optim is a full caffe_sgd one).
SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {
    "caffe_sgd": dict(momentum=0.9, weight_decay=5e-4, gamma=0.1, rules=UNIFORM_RULES),
    "adam": dict(gamma=0.1, weight_decay=0.0, rules=UNIFORM_RULES),
}


def multipliers(params: Any, rules: Sequence[Rule]) -> tuple[Any, Any]:
  """(lr_mult, decay_mult) trees of Python floats shaped like `params`."""
  compiled = [(re.compile(p), float(lr), float(dm)) for p, lr, dm in rules]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  lr_flat, decay_flat = {}, {}
  for path in flat:
    for pattern, lr, dm in compiled:
      if pattern.search(path):
        lr_flat[path], decay_flat[path] = lr, dm
        break
    else:
      lr_flat[path], decay_flat[path] = 1.0, 1.0
  unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep="/")  # noqa: E731
  return unflat(lr_flat), unflat(decay_flat)


def step_lr(step: jax.Array, base_lr: float, gamma: float, stepsize: jax.Array) -> jax.Array:
  """Caffe "step" policy."""
  return base_lr * gamma ** jnp.floor(step / stepsize)


def _per_multiplier(group: Callable[[float, float], optax.GradientTransformation], lr_mult: Any,
                    decay_mult: Any) -> optax.GradientTransformation:
  """`group(lr_mult, decay_mult)` on the parameters of each multiplier pair (lr multiplier 0: set_to_zero)."""
  label = lambda lm, dm: f"lr_mult={lm},decay_mult={dm}"  # noqa: E731
  pairs = {label(lm, dm): (lm, dm) for lm, dm in zip(jax.tree.leaves(lr_mult), jax.tree.leaves(decay_mult))}
  return optax.partition({k: optax.set_to_zero() if lm == 0 else group(lm, dm) for k, (lm, dm) in pairs.items()},
                         jax.tree.map(label, lr_mult, decay_mult))


def _step_decayed(base_lr: float, gamma: float, lr_mult: Any,
                  trained: Callable[[jax.Array], optax.GradientTransformation]) -> optax.GradientTransformation:
  """`trained(lr)` on the parameters with a nonzero lr multiplier (no update and no state for the others), lr
  step-decayed from the injected `step` and `stepsize` hyperparameters."""
  labels = jax.tree.map(lambda lm: "frozen" if lm == 0 else "trained", lr_mult)

  def factory(step: jax.Array, stepsize: jax.Array) -> optax.GradientTransformation:
    lr = step_lr(step, base_lr, gamma, stepsize)
    return optax.partition({"trained": trained(lr), "frozen": optax.set_to_zero()}, labels)

  # Strong int32 scalars (the state the step fills in keeps its types through lax.scan and lax.cond), as NumPy
  # arrays: building an optimiser (config validation) starts no JAX backend.
  return optax.inject_hyperparams(factory)(step=np.zeros((), np.int32), stepsize=np.ones((), np.int32))


def with_step(opt_state: Any, step: jax.Array, stepsize: jax.Array) -> Any:
  """`opt_state` with the step and the solver's step size the next update decays the learning rate by.

  Fills the `step`/`stepsize` hyperparameters wherever an `inject_hyperparams` state has them (a state
  without them is returned as it is)."""
  values = {"step": jnp.asarray(step, jnp.int32), "stepsize": jnp.asarray(stepsize, jnp.int32)}
  injected = lambda s: isinstance(s, optax.InjectStatefulHyperparamsState)  # noqa: E731

  def put(s):
    if not injected(s):
      return s
    return s._replace(hyperparams={k: values.get(k, v) for k, v in s.hyperparams.items()})

  return jax.tree.map(put, opt_state, is_leaf=injected)


def caffe_sgd(base_lr: float, momentum: float, weight_decay: float, gamma: float, lr_mult: Any,
              decay_mult: Any) -> optax.GradientTransformation:
  """Caffe's SGD: per multiplier pair, decay -> scale by -lr * lr_mult -> momentum trace (Caffe keeps lr in v)."""

  def trained(lr):
    return _per_multiplier(lambda lm, dm: optax.chain(optax.add_decayed_weights(weight_decay * dm),
                                                      optax.scale(-(lr * lm)), optax.trace(momentum)),
                           lr_mult, decay_mult)

  return _step_decayed(base_lr, gamma, lr_mult, trained)


def adam(base_lr: float, gamma: float, lr_mult: Any, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """optax's AdamW with a step-decayed learning rate, its updates scaled by per-parameter lr multipliers."""
  ones = jax.tree.map(lambda _: 1.0, lr_mult)

  def trained(lr):
    return optax.chain(optax.adamw(lr, weight_decay=weight_decay),
                       _per_multiplier(lambda lm, _: optax.scale(lm), lr_mult, ones))

  return _step_decayed(base_lr, gamma, lr_mult, trained)


def make_optimizer(cfg: Any, params: Any, freeze: str = "") -> optax.GradientTransformation:
  """The optimiser a config's `optim` section describes, for `params` (their paths select the multipliers).

  `freeze`: a regex of parameter paths held fixed (a first rule with lr multiplier 0), e.g. a frozen backbone.
  """
  name = cfg.get("name", "caffe_sgd")
  if name not in SOLVER_DEFAULTS:
    raise ValueError(f"unknown optim.name {name!r}; expected one of {', '.join(SOLVER_DEFAULTS)}")
  o = {**SOLVER_DEFAULTS[name], **{k: v for k, v in dict(cfg).items() if k != "name"}}
  rules = [tuple(r) for r in o["rules"]]
  if freeze:
    rules = [(freeze, 0.0, 0.0), *rules]
  lr_mult, decay_mult = multipliers(params, rules)
  if name == "caffe_sgd":
    return caffe_sgd(o["base_lr"], o["momentum"], o["weight_decay"], o["gamma"], lr_mult, decay_mult)
  return adam(o["base_lr"], o["gamma"], lr_mult, o["weight_decay"])
