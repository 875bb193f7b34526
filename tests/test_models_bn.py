"""BatchNorm models under `jax.vmap` over trials: per-trial statistics, frozen BN, stochastic depth."""

import jax
import jax.numpy as jnp
import numpy as np

from agejax.models.efficientnet import efficientnet_layout
from agejax.models.registry import build_model

# 64 px keeps a 2x2 map at the head; at 1x1 the batch variance is tiny and amplifies rounding noise.
TRIALS, BATCH, SIZE = 3, 4, 64


def _model(arch: str, **backbone):
  if arch.startswith("efficientnet"):
    # Half depth (10 blocks) keeps compile times short on CPU.
    backbone = {"stochastic_depth": 0.0, "depth_mult": 0.5, **backbone}
  return build_model({"arch": arch, "head": "dex", "backbone": {"width": 0.25, "dropout": 0.0, **backbone}})


def _random_variables(model, seed: int):
  """Random variables of the model's shapes, drawn with numpy (jitting `init` compiles for ~40 s on CPU)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim > 1:
      return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if "var" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return ((1.0 if "scale" in name else 0.0) + rng.normal(0, 0.1, leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _stacked_init(model, seeds):
  return jax.tree.map(lambda *a: np.stack(a), *[_random_variables(model, s) for s in seeds])


def _images(seed: int) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (TRIALS, BATCH, SIZE, SIZE, 3))


def _train_apply(model):
  def apply(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])
  return apply


def _trial(tree, t):
  return jax.tree.map(lambda a: a[t], tree)


def test_vmapped_batch_stats_match_each_trial_alone():
  model = _model("efficientnet_b0")
  variables = _stacked_init(model, range(TRIALS))
  x = _images(1)
  out, new = jax.jit(jax.vmap(_train_apply(model)))(variables, x)
  apply = jax.jit(_train_apply(model))
  for t in range(TRIALS):
    out_t, new_t = apply(_trial(variables, t), x[t])
    np.testing.assert_allclose(out[t], out_t, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b, t=t: np.testing.assert_allclose(a[t], b, rtol=1e-4, atol=1e-5),
                 new["batch_stats"], new_t["batch_stats"])
  # Statistics moved, and differently per trial (each saw its own images).
  mean0 = new["batch_stats"]["backbone"]["stem"]["bn"]["mean"]
  assert not np.allclose(mean0, variables["batch_stats"]["backbone"]["stem"]["bn"]["mean"])
  assert not np.allclose(mean0[0], mean0[1])
  # Train mode normalises with batch statistics, so it differs from eval mode.
  eval_out = jax.jit(jax.vmap(model.apply))(variables, x)
  assert not np.allclose(out, eval_out, atol=1e-4)


def test_frozen_bn_keeps_running_statistics():
  model = _model("efficientnet_lite0", bn_train=False)
  variables = _stacked_init(model, range(2, 2 + TRIALS))
  x = _images(3)
  out, new = jax.jit(jax.vmap(_train_apply(model)))(variables, x)
  jax.tree.map(np.testing.assert_array_equal, new["batch_stats"], variables["batch_stats"])
  eval_out = jax.jit(jax.vmap(model.apply))(variables, x)
  np.testing.assert_allclose(out, eval_out, rtol=1e-5, atol=1e-5)


def test_stochastic_depth_drops_residual_branches_in_training():
  x = _images(4)[0]

  def train_outputs(model, variables):
    run = jax.jit(lambda key: model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0])
    return run(jax.random.key(0)), run(jax.random.key(1))

  dropping = _model("efficientnet_b0", stochastic_depth=0.9)
  variables = _random_variables(dropping, 0)
  a, b = train_outputs(dropping, variables)
  assert not np.allclose(a, b)
  # Without stochastic depth the same keys give the same outputs: the difference came from the drops.
  a, b = train_outputs(_model("efficientnet_b0"), variables)
  np.testing.assert_array_equal(a, b)


def test_lite_layout_matches_the_builder_table():
  stem, blocks, head = efficientnet_layout(1.0, 1.0, lite=True)
  assert (stem, head, len(blocks)) == (32, 1280, 16)
  assert all(b.squeeze == 0 for b in blocks)
  # Lite4 scales depth except for the first and last stages, and never the stem or head.
  stem4, blocks4, head4 = efficientnet_layout(1.4, 1.8, lite=True)
  stages = [b.stage for b in blocks4]
  assert (stem4, head4) == (32, 1280)
  assert stages.count(0) == 1 and stages.count(6) == 1 and stages.count(5) == 8
