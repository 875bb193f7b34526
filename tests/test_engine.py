"""The trial engine: sample order, Caffe SGD semantics, strategies agree, NaN detection."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from agejax.configs import tiny_vgg
from agejax.data.synthetic import synthetic_dataset
from agejax.engine import trials as T
from agejax.engine.optim import CAFFE_VGG_RULES, make_optimizer, multipliers, with_step
from agejax.experiments.engines import trial_starter
from agejax.experiments.priors import resolve_prior

RES = 32


def test_sample_order_is_per_epoch_shuffles():
  items = np.arange(100, 107)
  order = T.sample_order(items, steps=7, batch_size=3, seed=5)
  assert order.shape == (7, 3)
  flat = order.ravel()
  for e in range(3):  # every complete epoch visits each item once
    assert sorted(flat[e * 7:(e + 1) * 7]) == list(items)
  assert not np.array_equal(flat[:7], flat[7:14])  # reshuffled per epoch
  np.testing.assert_array_equal(order, T.sample_order(items, 7, 3, 5))
  assert not np.array_equal(order, T.sample_order(items, 7, 3, 6))
  few = T.sample_order(np.array([4, 9, 11]), steps=2, batch_size=10, seed=0)  # fewer items than a batch
  assert set(few.ravel()) == {4, 9, 11}


def test_caffe_sgd_matches_hand_computation():
  params = {"backbone": {"conv1_1": {"kernel": jnp.full((2,), 2.0), "bias": jnp.full((2,), 1.0)},
                         "fc6": {"kernel": jnp.full((2,), 3.0), "bias": jnp.full((2,), -1.0)}}}
  lr_mult, decay_mult = multipliers(params, CAFFE_VGG_RULES)
  assert lr_mult["backbone"]["fc6"]["bias"] == 20 and decay_mult["backbone"]["fc6"]["bias"] == 0
  assert lr_mult["backbone"]["conv1_1"]["bias"] == 2 and lr_mult["backbone"]["conv1_1"]["kernel"] == 1
  cfg = ml_collections.ConfigDict(dict(name="caffe_sgd", base_lr=0.1, momentum=0.9, weight_decay=0.01, gamma=0.1,
                                       rules=CAFFE_VGG_RULES))
  opt = make_optimizer(cfg, params)
  grads = jax.tree.map(jnp.ones_like, params)
  state = opt.init(params)
  updates, state = opt.update(grads, with_step(state, 0, 1), params)
  p1 = optax.apply_updates(params, updates)
  # fc6 kernel: v = 0.1*10*(1 + 0.01*1*3) = 1.03
  np.testing.assert_allclose(p1["backbone"]["fc6"]["kernel"], 3.0 - 1.03, rtol=1e-6)
  # conv bias: no decay, lr x2
  np.testing.assert_allclose(p1["backbone"]["conv1_1"]["bias"], 1.0 - 0.2, rtol=1e-6)
  # step 1 with stepsize 1: lr = 0.1 * 0.1; momentum carries 0.9 * v
  p2 = optax.apply_updates(p1, opt.update(grads, with_step(state, 1, 1), p1)[0])
  v = 0.9 * 1.03 + 0.01 * 10 * (1 + 0.01 * (3.0 - 1.03))
  np.testing.assert_allclose(p2["backbone"]["fc6"]["kernel"], 3.0 - 1.03 - v, rtol=1e-5)


@pytest.fixture(scope="module")
def setup():
  prior = resolve_prior({"name": "s", "model": tiny_vgg(width=1 / 32, fc_dim=32) | {"head": "regression"}},
                        {"head": "regression", "preprocess": {"channel_order": "RGB", "scale": 1.0}}, RES, 0)
  cfg = ml_collections.ConfigDict(dict(name="caffe_sgd", base_lr=1e-3, momentum=0.9, weight_decay=5e-4, gamma=0.1,
                                       rules=CAFFE_VGG_RULES))
  opt = make_optimizer(cfg, prior.variables["params"])
  chunk = T.make_train_chunk(prior.model, "regression", prior.preprocess, opt, T.StepConfig(4, RES))
  predict = T.make_predict(prior.model, "regression", prior.preprocess)
  x, y = synthetic_dataset(40, RES + 4, seed=3)
  return prior, opt, chunk, predict, jnp.asarray(x), jnp.asarray(y)


def _run(setup, strategy, seeds, steps=6, max_iter=5):
  prior, opt, chunk, predict, pool, ages = setup
  runner = T.TrialRunner(chunk, predict, strategy)
  start = trial_starter(prior, opt, RES)
  orders = np.stack([T.sample_order(np.arange(s, s + 6), steps, 4, s) for s in seeds])
  hyper = T.Hyper(jnp.int32(3), jnp.int32(max_iter))
  out_losses, out_preds = [], []
  layout = runner.layout(None, len(seeds))
  for sl in layout.slices:
    state = runner.group([start(s) for s in seeds[sl]], layout)
    state, losses = runner.train(state, orders[sl], 0, hyper, pool, ages)
    out_losses.append(losses)
    out_preds.append(T.evaluate(runner, state, pool[:10], RES, 8))
  return np.concatenate(out_losses), np.concatenate(out_preds)


def test_strategies_agree_and_trial_equals_lone_run(setup):
  seeds = [0, 1, 2]
  loss_v, pred_v = _run(setup, "vmap", seeds)
  loss_m, pred_m = _run(setup, "map", seeds)
  loss_l, pred_l = _run(setup, "loop", seeds)
  assert loss_v.shape == (3, 6)
  assert np.all(loss_v[:, 5] == 0)  # the step past max_iter is skipped
  assert not np.allclose(pred_v[0], pred_v[1])  # trials differ
  np.testing.assert_allclose(loss_v, loss_l, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(loss_m, loss_l, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pred_v, pred_l, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(pred_m, pred_l, rtol=1e-4, atol=1e-3)
  _, lone = _run(setup, "vmap", [2])  # trial 2 of the vmapped run == a lone run with seed 2
  np.testing.assert_allclose(lone[0], pred_v[2], rtol=1e-4, atol=1e-3)


def test_loop_groups_are_stacked_groups_of_one_sharing_one_program(setup):
  prior, opt, chunk, predict, pool, ages = setup
  runner = T.TrialRunner(chunk, predict, "loop")
  start = trial_starter(prior, opt, RES)
  orders = np.stack([T.sample_order(np.arange(s, s + 6), 4, 4, s) for s in range(3)])
  layout = runner.layout(None, 3)
  assert layout.mesh is None and layout.group_size == 1 and len(layout.slices) == 3
  with pytest.raises(ValueError, match="1 to 1 trials"):
    runner.group([start(0), start(1)], layout)
  for sl in layout.slices:
    state = runner.group([start(s) for s in range(sl.start, sl.stop)], layout)
    assert {x.shape[0] for x in jax.tree.leaves(state)} == {1}  # a leading trial axis, as in every group
    state, losses = runner.train(state, orders[sl], 0, T.Hyper(jnp.int32(3), jnp.int32(4)), pool, ages)
    assert losses.shape == (1, 4) and runner.predict(state, pool[:8, :RES, :RES]).shape == (1, 8)
    (lone,) = runner.ungroup(state, 1)
    assert jax.tree.map(np.shape, lone.params) == jax.tree.map(np.shape, start(0).params)
  assert runner.trace_counts == {("loop", 1): 1}  # one compiled program for every group
  train, _ = T.batched(chunk, predict, "loop")
  two = T.stack_trees([start(0), start(1)])
  with pytest.raises(ValueError, match="one trial per device"):
    jax.eval_shape(train, two, 0, T.Hyper(3, 4), orders[:2], pool, ages)


def test_auto_strategy_measures_once_and_caches(tmp_path, monkeypatch):
  monkeypatch.setenv("AGEJAX_CACHE", str(tmp_path))
  calls = []

  def measure(name):
    calls.append(name)
    return {"vmap": 3.0, "map": 2.0, "loop": 1.0}[name]

  assert T.choose_strategy("k1", measure)[0] == "loop"
  assert T.choose_strategy("k1", measure)[0] == "loop"
  assert calls == ["vmap", "map", "loop"]  # the second call came from the cache
  assert (tmp_path / "auto_strategy.json").exists()
