"""The per-trial memory estimate and the trial chunking it drives."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agejax.configs import tiny_vgg
from agejax.engine import memory
from agejax.engine.optim import make_optimizer
from agejax.models import build_model


def _vgg(width):
  model = build_model(tiny_vgg(width=width, fc_dim=32))
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                                jnp.ones((1, 32, 32, 3))))
  return model, variables


def test_estimate_counts_state_and_scales_with_batch_and_width():
  model, variables = _vgg(1 / 16)
  opt = make_optimizer(ml_collections.ConfigDict(dict(name="adam", base_lr=1e-3, rules=((".*", 1.0, 1.0),))),
                       variables["params"])
  opt_state = jax.eval_shape(opt.init, variables["params"])
  est = memory.estimate_trial_memory(model, variables, opt_state, 4, 32)
  params = sum(np.prod(x.shape) * 4 for x in jax.tree.leaves(variables["params"]))
  assert est.params == est.grads == params
  assert est.optimizer >= 2 * params  # Adam keeps two moments
  bigger_batch = memory.estimate_trial_memory(model, variables, opt_state, 8, 32)
  assert bigger_batch.activations == 2 * est.activations
  wide_model, wide_vars = _vgg(1 / 8)
  wide = memory.estimate_trial_memory(wide_model, wide_vars, jax.eval_shape(opt.init, wide_vars["params"]), 4, 32)
  assert wide.params > est.params and wide.activations > est.activations
  assert est.total == sum(v for k, v in est.to_dict().items() if k != "total")


def test_trials_that_fit():
  per = memory.TrialMemory(params=100, grads=100, optimizer=100, batch_stats=0, activations=700)
  assert memory.trials_that_fit(per, 10_000) == 8  # 10,000 * 0.8 / 1,000
  assert memory.trials_that_fit(per, 10_000, shared_bytes=3_000) == 5
  assert memory.trials_that_fit(per, 10) == 1  # never fewer than one trial
  assert memory.device_memory_bytes() > 2**30  # the host's memory on CPU


def test_compiled_bytes_reads_xla_analysis():
  compiled = jax.jit(lambda x: (x * 2).sum()).lower(jnp.ones((256, 256))).compile()
  got = memory.compiled_bytes(compiled)
  assert got is None or got >= 256 * 256 * 4


@functools.cache
def _base_prior():
  from agejax.experiments.priors import resolve_prior
  from configs.demo import get_config

  cfg = get_config("quick,tiny")
  return resolve_prior(dict(cfg.priors[0]), cfg.model, cfg.data.crop, 0)


def _engine(**trials):
  from agejax.experiments.engines import PriorEngine, with_engine_backbone
  from configs.demo import get_config

  cfg = get_config("quick,tiny")
  cfg.trials.update(conv_impl="lax", **trials)
  prior = with_engine_backbone(_base_prior(), cfg.trials.conv_impl, cfg.trials.compute_dtype)
  return PriorEngine(cfg, prior, 2), prior


def test_engine_chunks_trials_to_fit_the_memory_budget():
  engine, _ = _engine(memory_budget_gb=0.0)
  assert engine.trial_chunk == 0 or engine.trial_chunk > 1000  # the host's memory holds any trial count
  per_trial = engine.memory.total
  budget_gb = 3.5 * per_trial / 0.8 / 2**30  # room for three trials and a half
  small, _ = _engine(memory_budget_gb=budget_gb)
  assert small.trial_chunk == 3
  assert small.runner("vmap").layout(None, 8).slices == (slice(0, 3), slice(3, 6), slice(6, 8))


def test_bf16_compute_keeps_float32_master_weights():
  from agejax.engine import trials as trials_lib

  engine, prior = _engine(compute_dtype="bfloat16")
  assert prior.spec["backbone"]["dtype"] == "bfloat16"
  state = engine.initial_state(0)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
  rng = np.random.default_rng(0)
  crop = engine.cfg.data.crop
  pool = jnp.asarray(rng.integers(0, 256, (16, crop + 4, crop + 4, 3), dtype=np.uint8))
  ages = jnp.asarray(rng.uniform(1, 80, 16).astype(np.float32))
  runner = engine.runner("loop")
  order = trials_lib.sample_order(np.arange(16), 2, engine.cfg.batch_size, 0)
  hyper = trials_lib.Hyper(jnp.int32(100), jnp.int32(2))
  new, losses = runner.train(runner.group([state], runner.layout(None, 1)), order[None], 0, hyper, pool, ages)
  assert np.isfinite(losses).all() and losses.shape == (1, 2)
  assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype("float32")}
  assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(state.params)[0])
