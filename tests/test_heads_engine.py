"""Every age head inside the trial engine: vmapped == looped == lone trials, and the same draws for every head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agejax.data.synthetic import synthetic_dataset
from agejax.engine import trials as T
from agejax.engine.fit import FROZEN_BACKBONE
from agejax.engine.optim import make_optimizer
from agejax.errors import ConfigError
from agejax.experiments import plan
from agejax.experiments.engines import trial_starter
from agejax.experiments.priors import resolve_prior
from agejax.main import run_config
from agejax.models import register_backbone, save_pretrained
from agejax.models.heads import AGE_KINDS, AgeHead
from agejax.predict import age_decoder
from configs import demo, utkface

RES = 12
PRE = {"channel_order": "RGB", "scale": 1.0}


class TinyBackbone(nn.Module):
  """A dense layer on 4x4-pooled pixels, with dropout: quick to compile, so every head can be tried."""

  conv_impl: str = "lax"
  dtype: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.avg_pool(x.astype(jnp.float32), (4, 4), (4, 4)).reshape(x.shape[0], -1)
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.relu(nn.Dense(8, name="fc")(x))


register_backbone("tiny_heads_test", TinyBackbone)
MODEL = {"arch": "tiny_heads_test", "head": "dex"}


@pytest.fixture(scope="module")
def pool():
  x, y = synthetic_dataset(24, RES + 2, seed=1)
  return jnp.asarray(x), jnp.asarray(y)


def _engine(prior, rules=((".*", 1.0, 1.0),)):
  """(chunk, predict, start): one trial's compiled pieces, shared by the strategies."""
  opt = make_optimizer(ml_collections.ConfigDict(dict(name="adam", base_lr=1e-2, gamma=0.1, rules=rules)),
                       prior.variables["params"])
  chunk = T.make_train_chunk(prior.model, prior.head_kind(), prior.preprocess, opt, T.StepConfig(4, RES))
  return chunk, T.make_predict(prior.model, prior.head_kind(), prior.preprocess), trial_starter(prior, opt, RES)


def _trials(engine, strategy, seeds, pool, evaluate=False):
  """(losses (T, steps), final parameters per trial, test predictions (T, 8) or None)."""
  chunk, predict, start = engine
  runner = T.TrialRunner(chunk, predict, strategy)
  orders = np.stack([T.sample_order(np.arange(2 * s, 2 * s + 6), 4, 4, s) for s in seeds])
  losses, params, preds = [], [], []
  layout = runner.layout(None, len(seeds))
  for sl in layout.slices:
    state = runner.group([start(s) for s in seeds[sl]], layout)
    state, loss = runner.train(state, orders[sl], 0, T.Hyper(jnp.int32(2), jnp.int32(4)), *pool)
    losses.append(loss)
    if evaluate:
      preds.append(T.evaluate(runner, state, pool[0][:8], RES, 8))
    params += [jax.device_get(st.params) for st in runner.ungroup(state, sl.stop - sl.start)]
  return np.concatenate(losses), params, np.concatenate(preds) if evaluate else None


@pytest.mark.parametrize("kind", AGE_KINDS)
def test_head_trials_vmapped_equal_lone(kind, pool):
  """'loop' runs each trial as a lone program: trial i of the vmapped group must equal it, for every head."""
  prior = resolve_prior({"name": kind, "model": MODEL, "head": "new", "head_type": kind}, {"preprocess": PRE}, RES, 0)
  assert prior.head_kind().kind == kind and prior.spec["head"] == kind
  engine = _engine(prior)
  loss_v, params_v, pred_v = _trials(engine, "vmap", [0, 1, 2], pool, evaluate=True)
  loss_l, params_l, _ = _trials(engine, "loop", [0, 1, 2], pool)
  assert np.isfinite(loss_v).all() and not np.allclose(loss_v[:, 0], loss_v[:, -1])  # it trains
  assert np.isfinite(pred_v).all() and pred_v.shape == (3, 8) and (pred_v >= 0).all()
  head_v = [p["head"] for p in params_v]
  assert not np.allclose(jax.tree.leaves(head_v[0])[0], jax.tree.leaves(head_v[1])[0])  # trials differ
  np.testing.assert_allclose(loss_v, loss_l, rtol=1e-4, atol=1e-4)
  for t in range(3):
    # Adam divides tiny gradients by their tiny RMS: float noise may move a weight by a fraction of one step (1e-2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4), params_v[t], params_l[t])


def test_head_options_reach_the_engine():
  prior = resolve_prior({"name": "d", "model": MODEL, "head_type": "dldl_v2",
                         "head_options": {"sigma": 3.0, "decode": "median"}}, {"preprocess": PRE}, RES, 0)
  head = prior.head_kind()
  assert isinstance(head, AgeHead) and head.decoding == "median" and head.option("sigma") == 3.0
  assert head.option("lambda_l1") == 1.0
  with pytest.raises(ConfigError, match=r"priors\[d\]\.head_options\.sigmaa is not a head option"):
    resolve_prior({"name": "d", "model": MODEL, "head_options": {"sigmaa": 1}}, {"preprocess": PRE}, RES, 0)
  with pytest.raises(ConfigError, match=r"priors\[d\] \(coral head\): loss_options\.sigma is not an option"):
    resolve_prior({"name": "d", "model": MODEL, "head_type": "coral", "head_options": {"sigma": 1.0}},
                  {"preprocess": PRE}, RES, 0)
  with pytest.raises(ConfigError, match=r"priors\[d\]\.head_type='softmax'"):
    resolve_prior({"name": "d", "model": MODEL, "head_type": "softmax"}, {"preprocess": PRE}, RES, 0)


def test_kept_dex_head_switches_loss_and_decoder(tmp_path):
  source = resolve_prior({"name": "s", "model": {**MODEL, "num_classes": 5, "bin_values": [0.5, 1, 2, 4, 8]}},
                         {"preprocess": PRE}, RES, 0)
  bins = [0.5, 1, 2, 4, 8]
  save_pretrained(str(tmp_path / "p"), {**MODEL, "num_classes": 5, "bin_values": bins}, source.variables,
                  source.preprocess)
  kept = resolve_prior({"name": "k", "dir": str(tmp_path / "p"), "head": "keep", "head_type": "dldl",
                        "head_options": {"decode": "median", "sigma": 1.0}}, {}, RES, 0)
  head = kept.head_kind()
  assert (head.kind, head.num_classes, head.decoding, head.bin_values) == ("dldl", 5, "median", tuple(bins))
  np.testing.assert_array_equal(kept.variables["params"]["head"]["fc"]["kernel"],
                                source.variables["params"]["head"]["fc"]["kernel"])  # the kept layer itself
  assert not kept.new_head
  with pytest.raises(ConfigError, match=r"head_type='coral' cannot reuse the kept 'dex' layer"):
    resolve_prior({"name": "k", "dir": str(tmp_path / "p"), "head": "keep", "head_type": "coral"}, {}, RES, 0)
  with pytest.raises(ConfigError, match=r"head_options\.num_classes is fixed by the kept head"):
    resolve_prior({"name": "k", "dir": str(tmp_path / "p"), "head": "keep", "head_options": {"num_classes": 7}},
                  {}, RES, 0)


def test_calibrated_kept_head(tmp_path, pool):
  """A kept head with `calibrate` starts as the kept head, and trained alone (configs/utkface.py's dlib-tuned
  rules) moves only its scale and shift, trial i vmapped == lone trial i; a saved calibrated prior loads as it is."""
  source = resolve_prior({"name": "s", "model": {**MODEL, "num_classes": 9}, "head": "keep"}, {"preprocess": PRE},
                         RES, 0)
  save_pretrained(str(tmp_path / "p"), {**MODEL, "num_classes": 9}, source.variables, source.preprocess)
  entry = {"name": "c", "dir": str(tmp_path / "p"), "head": "keep", "head_options": {"calibrate": 3.0}}
  calibrated = resolve_prior(entry, {}, RES, 0)
  head = calibrated.head_kind()
  assert (head.calibration, head.num_outputs, head.has_distribution) == (3.0, 1, False)
  x = pool[0][:8, 1:-1, 1:-1]
  untouched = source.head_kind().decode(source.model.apply(source.variables, source.preprocess(x)))
  start = head.decode(calibrated.model.apply(calibrated.variables, calibrated.preprocess(x)))
  np.testing.assert_allclose(start, untouched, rtol=1e-6)  # scale 1, shift 0: the kept head's own ages
  assert not np.allclose(untouched, untouched[0])

  engine = _engine(calibrated, rules=((FROZEN_BACKBONE, 0.0, 0.0), *utkface.CALIBRATION_ONLY))
  loss_v, params_v, _ = _trials(engine, "vmap", [0, 1, 2], pool)
  loss_l, params_l, _ = _trials(engine, "loop", [0, 1, 2], pool)
  np.testing.assert_allclose(loss_v, loss_l, rtol=1e-5, atol=1e-5)
  kept_inner = source.variables["params"]["head"]
  for t in range(3):
    jax.tree.map(np.testing.assert_array_equal, params_v[t]["head"]["inner"], kept_inner)  # frozen
    jax.tree.map(np.testing.assert_array_equal, params_v[t]["backbone"], source.variables["params"]["backbone"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_v[t], params_l[t])
  moved = np.array([[p["head"]["scale"], p["head"]["shift"]] for p in params_v])
  assert (np.abs(moved - [1.0, 0.0]) > 1e-3).all() and not np.allclose(moved[0], moved[1])

  save_pretrained(str(tmp_path / "q"), calibrated.spec, {"params": params_v[0]}, calibrated.preprocess)
  again = resolve_prior({"name": "q", "dir": str(tmp_path / "q"), "head": "keep"}, {}, RES, 0)
  assert again.head_kind().calibration == 3.0 and again.variables["params"]["head"]["scale"] == moved[0, 0]
  assert "calibrate" not in resolve_prior({"name": "n", "dir": str(tmp_path / "q"), "head": "new"}, {}, RES, 0).spec
  with pytest.raises(ConfigError, match=r"head_options\.calibrate is fixed by the kept head"):
    resolve_prior({"name": "q", "dir": str(tmp_path / "q"), "head": "keep", "head_options": {"calibrate": 30.0}},
                  {}, RES, 0)
  with pytest.raises(ConfigError, match=r"priors\[c\] \(dex head\): calibrate must be .* got 'mean'"):
    resolve_prior({**entry, "head_options": {"calibrate": "mean"}}, {}, RES, 0)
  with pytest.raises(ConfigError, match="a calibrated head predicts one age"):
    head.distribution(jnp.zeros((2, 1)))
  decode = age_decoder(again.spec)  # agejax.predict / agejax.export: an age, no SD
  age, sd = decode(jnp.array([[41.5]]))
  assert not decode.has_sd and sd is None and float(age[0]) == 41.5


def test_every_head_gets_the_same_draws(tmp_path, monkeypatch):
  """Trial i of every head trains on the same subset in the same order (they depend on size and seed only)."""
  orders: dict[int, list[np.ndarray]] = {}
  calls = []
  real = T.sample_order

  def recording(items, steps, batch_size, seed):
    out = real(items, steps, batch_size, seed)
    calls.append((seed, out))
    return out

  monkeypatch.setattr(plan, "sample_order", recording)
  c = demo.get_config("quick,tiny")
  c.data.update(resize=RES + 2, crop=RES)
  c.model.preprocess = dict(PRE, resize=RES + 2, crop=RES)
  kinds = ("dex", "coral", "regression")
  c.priors = [dict(name=k, model=MODEL, head="new", head_type=k) for k in kinds]
  c.sizes = [(3, 2, 2, 2)]
  c.save_trials = "none"
  run_config(c, str(tmp_path))
  for seed, order in calls:
    orders.setdefault(seed, []).append(order)
  assert sorted(orders) == [c.seed, c.seed + 1] and all(len(v) == len(kinds) for v in orders.values())
  for same in orders.values():
    for other in same[1:]:
      np.testing.assert_array_equal(same[0], other)
  for trial in range(2):
    texts = [(tmp_path / "splits" / k / "n00003" / f"trial{trial:02d}.txt").read_text().splitlines()[1:]
             for k in kinds]
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) == 3
