"""Frozen-prefix trials (config.trials.freeze): cached features train what recomputing the frozen layers trains."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agejax.configs import base_config, tiny_vgg
from agejax.data.synthetic import synthetic_dataset
from agejax.engine import features as F
from agejax.engine import trials as T
from agejax.engine.optim import make_optimizer
from agejax.errors import ConfigError
from agejax.experiments.priors import resolve_prior
from agejax.main import run_config
from agejax.models import build_model, load_pretrained
from agejax.models.pretrained import save_pretrained
from agejax.reports.tables import read_results

RES, SIDE, BATCH = 16, 20, 4
WRN = {"arch": "wrn16_8", "head": "dex", "backbone": {"depth": 10, "widen_factor": 1, "conv_impl": "lax"}}
PRE = {"channel_order": "RGB", "scale": 1.0}
DATA = {"crop": RES, "mirror": True, "random_crop": True}
OPTIM = ml_collections.ConfigDict(dict(name="caffe_sgd", base_lr=1e-2, momentum=0.9, weight_decay=5e-4, gamma=0.1))


@pytest.fixture(scope="module")
def setup():
  prior = resolve_prior({"name": "w", "model": WRN}, {"head": "dex", "preprocess": PRE}, RES, 0)
  x, y = synthetic_dataset(24, SIDE, seed=3)
  return prior, np.asarray(x), np.asarray(y, np.float32)


_RUNNERS = {}


def _runner(frozen, chunk_inputs, strategy):
  """(runner, starter) per split, input path and strategy, built once (one compilation)."""
  key = (id(frozen), chunk_inputs.__name__, strategy)
  if key not in _RUNNERS:
    opt = make_optimizer(OPTIM, frozen.tail_variables["params"])
    ident = lambda x: x  # noqa: E731
    chunk = T.make_train_chunk(frozen.tail, "dex", ident, opt, T.StepConfig(BATCH, RES), chunk_inputs)
    _RUNNERS[key] = (frozen, T.TrialRunner(chunk, T.make_predict(frozen.tail, "dex", ident), strategy),
                     frozen.initial_state(opt))
  return _RUNNERS[key][1:]


def _trials(frozen, chunk_inputs, pool, ages, seeds, strategy="loop", steps=5, eval_inputs=None):
  """Losses (T, steps), final states and (with `eval_inputs`) cached-feature predictions of each trial."""
  runner, start = _runner(frozen, chunk_inputs, strategy)
  orders = np.stack([T.sample_order(np.arange(s, s + 8), steps, BATCH, s) for s in seeds])
  hyper = T.Hyper(jnp.int32(100), jnp.int32(steps))
  losses, states, cached_preds = [], [], []
  layout = runner.layout(None, len(seeds))
  for sl in layout.slices:
    state = runner.group([start(s) for s in seeds[sl]], layout)
    state, loss = runner.train(state, orders[sl], 0, hyper, pool, ages)
    losses.append(loss)
    if eval_inputs is not None:
      cached_preds.append(T.evaluate(runner, state, eval_inputs, None, 8))
    states += runner.ungroup(state, sl.stop - sl.start)
  return np.concatenate(losses), states, (np.concatenate(cached_preds) if cached_preds else None)


def _full_predict(prior, frozen, state, images):
  variables = frozen.complete({"params": state.params, "batch_stats": state.batch_stats})
  predict = jax.jit(T.make_predict(prior.model, "dex", prior.preprocess))
  return np.asarray(predict(variables["params"], variables["batch_stats"], T.center_crop(jnp.asarray(images), RES)))


@pytest.mark.parametrize("freeze", ["backbone", "block2_1"])
def test_cached_equals_recomputed_frozen_layers(setup, freeze):
  prior, images, ages = setup
  frozen = F.build_frozen(prior, freeze, DATA, SIDE, cached_crops=-1)  # every crop offset: exact augmentation
  assert frozen.view.offsets == tuple(range(SIDE - RES + 1)) and frozen.view.num_variants == 50
  cache = jnp.asarray(frozen.compute(images, frozen.view.variants(), 8, progress=False))
  test = frozen.compute(images[:10], [(2, 2, False)], 8, progress=False)[:, 0]
  seeds = [0, 1]
  cached, c_states, c_preds = _trials(frozen, frozen.cached_inputs, cache, jnp.asarray(ages), seeds,
                                      eval_inputs=jnp.asarray(test))
  recomputed, r_states, _ = _trials(frozen, frozen.recompute_inputs, (jnp.asarray(images), prior.variables),
                                    jnp.asarray(ages), seeds)
  assert np.isfinite(cached).all() and np.ptp(cached) > 1e-3  # it trains
  np.testing.assert_allclose(cached, recomputed, atol=1e-5, rtol=1e-5)
  for c, r, p in zip(c_states, r_states, c_preds):
    pc, pr = _full_predict(prior, frozen, c, images[:10]), _full_predict(prior, frozen, r, images[:10])
    np.testing.assert_allclose(np.abs(pc - ages[:10]).mean(), np.abs(pr - ages[:10]).mean(), atol=1e-5)
    np.testing.assert_allclose(p, pc, atol=1e-4)  # the cached test features predict what the full model does
  # only the tail trained: the frozen stages' weights are the prior's
  whole = frozen.complete({"params": c_states[0].params})
  stem = whole["params"]["backbone"]["stem"]["kernel"]
  np.testing.assert_array_equal(stem, prior.variables["params"]["backbone"]["stem"]["kernel"])


def test_variants_follow_the_image_augmentation(setup):
  _, images, _ = setup
  view = F.view_of(DATA, SIDE, -1)
  key = jax.random.key(7)
  want = np.asarray(T.augment(key, jnp.asarray(images[:6]), RES, True, True))
  iy, ix, flip = map(np.asarray, view.choose(key, 6))
  for i in range(6):
    y, x = view.offsets[iy[i]], view.offsets[ix[i]]
    crop = images[i, y:y + RES, x:x + RES]
    np.testing.assert_array_equal(want[i], crop[:, ::-1] if flip[i] else crop)
  assert F.crop_offsets(SIDE, RES, True, 0) == (2,) and F.crop_offsets(SIDE, RES, True, 3) == (0, 2, 4)
  assert F.crop_offsets(SIDE, RES, False, -1) == (2,)


def test_vmapped_trial_equals_lone_trial_with_cache(setup):
  prior, images, ages = setup
  frozen = F.build_frozen(prior, "block3_1", DATA, SIDE, cached_crops=2)
  cache = jnp.asarray(frozen.compute(images, frozen.view.variants(), 8, progress=False))
  seeds = [0, 1, 2]
  together, states, _ = _trials(frozen, frozen.cached_inputs, cache, jnp.asarray(ages), seeds, "vmap")
  for i, s in enumerate(seeds):
    alone, lone_states, _ = _trials(frozen, frozen.cached_inputs, cache, jnp.asarray(ages), [s])
    np.testing.assert_allclose(together[i], alone[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(states[i].params), jax.tree.leaves(lone_states[0].params)):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_freeze_is_a_one_line_config_error(setup):
  prior, _, _ = setup
  with pytest.raises(ConfigError) as e:
    F.check_freeze("block9_9", prior.model.backbone, "priors[w].freeze")
  msg = str(e.value)
  assert "\n" not in msg and "priors[w].freeze='block9_9'" in msg and "block2_1" in msg
  vgg = build_model(tiny_vgg(1 / 32, 16)).backbone
  assert F.check_freeze("backbone", vgg) == "backbone"
  with pytest.raises(ConfigError, match="no named stages"):
    F.check_freeze("conv3_1", vgg)
  with pytest.raises(ConfigError, match="stem"):  # freezing before the first stage freezes nothing
    F.check_freeze("stem", prior.model.backbone)


def test_study_with_frozen_priors_shares_one_cache(setup, tmp_path, monkeypatch):
  prior, _, _ = setup
  save_pretrained(str(tmp_path / "wrn"), prior.spec, prior.variables, prior.preprocess)
  wrn = str(tmp_path / "wrn")
  calls = []
  real = F.compute_cache
  monkeypatch.setattr(F, "compute_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
  c = base_config()
  c.data.update(name="synthetic", resize=SIDE, crop=RES, pool_size=30, test_size=12)
  c.model.preprocess = PRE
  c.priors = [dict(name="head", dir=wrn, head="keep"), dict(name="head-again", dir=wrn, head="new"),
              dict(name="tail", dir=wrn, head="keep", freeze="block3_1")]
  c.sizes = [(4, 2, 100, 6)]
  c.batch_size = BATCH
  c.trials.update(freeze="backbone", parallel="vmap", conv_impl="lax", cached_crops=0)
  c.progress = False
  c.diagnostics = False
  c.eval_size_zero = False
  c.checkpoint.enabled = False
  rows = run_config(c, str(tmp_path / "w"))
  assert len(calls) == 2  # 'head' and 'head-again' share one prior directory, freeze and view
  assert {(r["prior"], r["freeze"]) for r in rows} == {("head", "backbone"), ("head-again", "backbone"),
                                                        ("tail", "block3_1")}
  assert all(np.isfinite(r["mae"]) for r in rows)
  header = open(tmp_path / "w" / "results.csv").readline().strip().split(",")
  assert "freeze" in header and len(read_results(tmp_path / "w" / "results.csv")) == 3 * 2
  # a trial's checkpoint is a whole prior: the frozen stem (the prior's) and the trained head
  _, variables, _ = load_pretrained(str(tmp_path / "w" / "checkpoints" / "tail" / "n00004_best"))
  assert {"stem", "block1_1", "block3_1"} <= set(variables["params"]["backbone"])
  np.testing.assert_array_equal(variables["params"]["backbone"]["stem"]["kernel"],
                                prior.variables["params"]["backbone"]["stem"]["kernel"])
  c.priors = [dict(name="bad", dir=wrn, head="keep", freeze="block7")]
  with pytest.raises(ConfigError, match=r"priors\[bad\]\.freeze='block7'"):
    run_config(c, str(tmp_path / "bad"))


def test_cache_that_does_not_fit_stays_on_host(setup):
  prior, images, _ = setup
  frozen = F.build_frozen(prior, "backbone", DATA, SIDE)
  small = F.compute_cache(frozen, images[:6], images[6:9], 4, budget_bytes=1024, progress=False)
  assert not small["on_device"] and isinstance(small["pool_images"], np.ndarray)
  assert small["pool_images"].shape == (6, 2, *frozen.feature_shape) and small["test_images"].shape[0] == 3
  assert frozen.cache_bytes(6, 3) == small["pool_images"].nbytes + small["test_images"].nbytes
  big = F.compute_cache(frozen, images[:6], images[6:9], 4, budget_bytes=2**40, progress=False)
  assert big["on_device"] and isinstance(big["pool_images"], jax.Array)
  np.testing.assert_allclose(np.asarray(big["pool_images"]), small["pool_images"], atol=1e-6)
  host = np.arange(40, dtype=np.float32).reshape(20, 2)
  idx = np.array([[[3, 3, 17], [5, 3, 0]]])  # (group, K, B)
  pool, remapped = F.take_rows(host, idx)
  assert pool.shape == (min(20, idx.size), 2)  # one shape for every chunk
  np.testing.assert_array_equal(np.asarray(pool)[remapped], host[idx])
