"""The optax optimisers equal the engine's former hand-written ones bit for bit; lr multiplier 0 freezes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from agejax.engine import step as step_lib
from agejax.engine.optim import make_optimizer, multipliers, step_lr, with_step

# Every kind of multiplier: x10/x1, x20/x0 (no decay), x1/x1, x0 (frozen), the default x1/x1 of unmatched paths.
RULES = ((r"fc[^/]*/kernel$", 10.0, 1.0), (r"fc[^/]*/bias$", 20.0, 0.0), (r"^frozen/", 0.0, 1.0),
         (r"conv[^/]*/kernel$", 1.0, 1.0))
STEPS, STEPSIZE = 7, 3  # the lr decays twice


def _params():
  rng = np.random.default_rng(0)
  shapes = {"backbone": {"conv1": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "fc6": {"kernel": (8, 5), "bias": (5,)}},
            "frozen": {"w": (6,)}}
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _grads(params, i):
  keys = jax.random.split(jax.random.key(i), len(jax.tree.leaves(params)))
  return jax.tree.unflatten(jax.tree.structure(params), [jax.random.normal(k, p.shape) for k, p in
                                                          zip(keys, jax.tree.leaves(params))])


# -- the former implementations (agejax/engine/optim.py before optax), kept here as the reference -------------
def _old_caffe(base_lr, momentum, weight_decay, gamma, lr_mult, decay_mult):
  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, v_tree, params, step, stepsize):
    lr = step_lr(step, base_lr, gamma, stepsize)

    def one(g, v, w, lm, dm):
      v = momentum * v + (lr * lm) * (g + (weight_decay * dm) * w)
      return w - v, v

    out = jax.tree.map(one, grads, v_tree, params, lr_mult, decay_mult)
    return jax.tree.map(lambda _, o: o[0], params, out), jax.tree.map(lambda _, o: o[1], params, out)

  return init, update


def _old_adam(base_lr, gamma, lr_mult, weight_decay):
  def init(params):
    return optax.adamw(base_lr, weight_decay=weight_decay).init(params)

  def update(grads, state, params, step, stepsize):
    tx = optax.adamw(step_lr(step, base_lr, gamma, stepsize), weight_decay=weight_decay)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u, m: u * m, updates, lr_mult)), state

  return init, update


def _run_both(cfg):
  params = _params()
  lr_mult, decay_mult = multipliers(params, RULES)
  if cfg.name == "caffe_sgd":
    old_init, old_update = _old_caffe(cfg.base_lr, cfg.momentum, cfg.weight_decay, cfg.gamma, lr_mult, decay_mult)
  else:
    old_init, old_update = _old_adam(cfg.base_lr, cfg.gamma, lr_mult, cfg.weight_decay)
  tx = make_optimizer(cfg, params)

  @jax.jit
  def new_update(grads, state, params, step, stepsize):
    updates, state = tx.update(grads, with_step(state, step, stepsize), params)
    return optax.apply_updates(params, updates), state

  old_update = jax.jit(old_update)
  p_old, s_old, p_new, s_new = params, old_init(params), params, tx.init(params)
  for i in range(STEPS):
    g = _grads(params, i)
    p_old, s_old = old_update(g, s_old, p_old, jnp.int32(i), jnp.int32(STEPSIZE))
    p_new, s_new = new_update(g, s_new, p_new, jnp.int32(i), jnp.int32(STEPSIZE))
  return params, p_old, p_new


@pytest.mark.parametrize("cfg", [
    dict(name="caffe_sgd", base_lr=0.05, momentum=0.9, weight_decay=5e-3, gamma=0.1),
    dict(name="adam", base_lr=0.01, gamma=0.5, weight_decay=0.0),
    dict(name="adam", base_lr=0.01, gamma=0.5, weight_decay=1e-2),
], ids=["caffe_sgd", "adam", "adamw"])
def test_optax_optimisers_equal_the_former_formulas_exactly(cfg):
  start, old, new = _run_both(ml_collections.ConfigDict(cfg | {"rules": RULES}))
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a, b)  # bit for bit, not within a tolerance
  assert not np.array_equal(start["backbone"]["fc6"]["kernel"], new["backbone"]["fc6"]["kernel"])


@pytest.mark.parametrize("name", ["caffe_sgd", "adam"])
def test_lr_mult_zero_freezes_and_holds_no_state(name):
  params = _params()
  cfg = ml_collections.ConfigDict(dict(name=name, base_lr=0.1, rules=RULES))
  tx = make_optimizer(cfg, params)
  state = tx.init(params)
  p = params
  for i in range(3):
    updates, state = tx.update(_grads(params, i), with_step(state, i, 2), p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_array_equal(p["frozen"]["w"], params["frozen"]["w"])
  assert not np.array_equal(p["backbone"]["conv1"]["kernel"], params["backbone"]["conv1"]["kernel"])
  sizes = sorted({x.shape for x in jax.tree.leaves(state)})
  assert (6,) not in sizes and (8, 5) in sizes  # no moment/momentum buffer for the frozen leaf


def test_freeze_pattern_takes_precedence_over_rules():
  params = _params()
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="adam", base_lr=0.1, rules=RULES)), params,
                      freeze=r"^backbone/fc6/")  # RULES train fc6 at x10: the freeze wins
  updates, _ = tx.update(_grads(params, 0), with_step(tx.init(params), 0, 1), params)
  assert not np.any(updates["backbone"]["fc6"]["kernel"]) and not np.any(updates["backbone"]["fc6"]["bias"])
  assert np.all(updates["backbone"]["conv1"]["kernel"] != 0)


def test_with_step_sets_the_injected_step_and_leaves_other_states():
  params = _params()
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="caffe_sgd", base_lr=0.1)), params)
  assert not tx.init(params).hyperparams["step"].weak_type  # a strong int32: scan and cond carries keep types
  state = with_step(tx.init(params), 5, 2)
  assert int(state.hyperparams["step"]) == 5 and int(state.hyperparams["stepsize"]) == 2
  assert state.hyperparams["step"].dtype == jnp.int32
  plain = optax.sgd(0.1).init(params)
  assert jax.tree.structure(with_step(plain, 5, 2)) == jax.tree.structure(plain)


def test_predict_padded_pads_the_last_batch_and_crops():
  images = jnp.arange(7 * 6 * 6 * 3, dtype=jnp.float32).reshape(7, 6, 6, 3)
  seen = []

  def predict(batch):  # (2 trials, batch) ages: the batch on the last axis
    seen.append(batch.shape)
    return jnp.stack([batch.mean(axis=(1, 2, 3)), -batch.mean(axis=(1, 2, 3))])

  out = step_lib.predict_padded(predict, images, 3, crop=4)
  want = step_lib.center_crop(images, 4).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(out, np.stack([want, -want]), rtol=1e-6)
  assert set(seen) == {(3, 4, 4, 3)}  # one shape: the last batch of 1 padded to 3
  single = step_lib.predict_padded(lambda b: b.mean(axis=(1, 2, 3)), images, 4, crop=None)
  np.testing.assert_allclose(single, images.mean(axis=(1, 2, 3)), rtol=1e-6)
