"""Optimisers with the paper's semantics.

Caffe SGD (the paper's solver), per parameter with learning-rate and decay multipliers:
  v <- momentum * v + lr * lr_mult * (g + weight_decay * decay_mult * w);   w <- w - v
  lr = base_lr * gamma ** floor(iter / stepsize)          (lr_policy "step")
Multipliers come from ordered (regex, lr_mult, decay_mult) rules matched against parameter paths
like 'backbone/fc6/kernel'; the first match wins, so the authors' prototxt (conv weights x1/x1,
biases x2/x0, fc layers x10/x1 and x20/x0) is a list of four rules in the config.

Adam (the transfer report) is optax's, with the same rules' lr multipliers (0 freezes a parameter).
"""

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
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


def step_lr(step: jax.Array, base_lr: float, gamma: float, stepsize: int) -> jax.Array:
  """Caffe "step" policy."""
  return base_lr * gamma ** jnp.floor(step / stepsize)


class CaffeSGDState(NamedTuple):
  momentum: Any


class CaffeSGD(NamedTuple):
  """Caffe's SGD as a pair of pure functions over explicit pytrees.

  `stepsize` is an argument of `update` (not a field) so one compiled step serves every size.
  """

  base_lr: float
  momentum: float
  weight_decay: float
  gamma: float
  lr_mult: Any
  decay_mult: Any

  def init(self, params: Any) -> CaffeSGDState:
    return CaffeSGDState(jax.tree.map(jnp.zeros_like, params))

  def update(self, grads: Any, state: CaffeSGDState, params: Any, step: jax.Array,
             stepsize: jax.Array) -> tuple[Any, CaffeSGDState]:
    lr = step_lr(step, self.base_lr, self.gamma, stepsize)

    def one(g, v, w, lm, dm):
      v = self.momentum * v + (lr * lm) * (g + (self.weight_decay * dm) * w)
      return w - v, v

    out = jax.tree.map(one, grads, state.momentum, params, self.lr_mult, self.decay_mult)
    new_params = jax.tree.map(lambda _, o: o[0], params, out)
    new_v = jax.tree.map(lambda _, o: o[1], params, out)
    return new_params, CaffeSGDState(new_v)


class AdamOpt(NamedTuple):
  """Adam with a step-decayed learning rate and per-parameter lr multipliers (0 = frozen)."""

  base_lr: float
  gamma: float
  lr_mult: Any
  weight_decay: float = 0.0

  def _tx(self, lr: jax.Array | float) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=self.weight_decay)

  def init(self, params: Any) -> Any:
    return self._tx(self.base_lr).init(params)

  def update(self, grads: Any, state: Any, params: Any, step: jax.Array, stepsize: jax.Array) -> tuple[Any, Any]:
    updates, state = self._tx(step_lr(step, self.base_lr, self.gamma, stepsize)).update(grads, state, params)
    updates = jax.tree.map(lambda u, m: u * m, updates, self.lr_mult)
    return optax.apply_updates(params, updates), state


def make_optimizer(cfg: Any, params: Any) -> CaffeSGD | AdamOpt:
  """Builds the optimiser a config's `optim` section describes."""
  rules = [tuple(r) for r in cfg.get("rules", UNIFORM_RULES)]
  lr_mult, decay_mult = multipliers(params, rules)
  name = cfg.get("name", "caffe_sgd")
  if name == "caffe_sgd":
    return CaffeSGD(cfg.base_lr, cfg.get("momentum", 0.9), cfg.get("weight_decay", 5e-4), cfg.get("gamma", 0.1),
                    lr_mult, decay_mult)
  if name == "adam":
    return AdamOpt(cfg.base_lr, cfg.get("gamma", 0.1), lr_mult, cfg.get("weight_decay", 0.0))
  raise ValueError(f"unknown optim.name {name!r}; expected 'caffe_sgd' or 'adam'")
