"""Age heads: hand-computed cases of the published formulas, coral-pytorch parity, training, and the old API."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agejax.errors import ConfigError
from agejax.models.heads import (
  AGE_KINDS,
  ORDINAL_KINDS,
  AgeHead,
  age_distribution,
  age_head,
  age_loss,
  head_module,
  make_head,
  predict_age,
  rank_levels,
)


def _head(spec) -> AgeHead:
  return spec if isinstance(spec, AgeHead) else age_head(spec)


@functools.partial(jax.jit, static_argnums=0)
def _loss(head, outputs, ages):
  return head.loss(outputs, ages)


@functools.partial(jax.jit, static_argnums=0)
def _decode(head, outputs):
  return head.decode(outputs)


@functools.partial(jax.jit, static_argnums=0)
def _distribution(head, outputs):
  return head.distribution(outputs)


# Jitted (one compilation per case instead of one per eager operation); `spec` is a spec or an AgeHead.
def loss(spec, outputs, ages):
  return _loss(_head(spec), jnp.asarray(outputs, jnp.float32), jnp.asarray(ages, jnp.float32))


def decode(spec, outputs):
  return _decode(_head(spec), jnp.asarray(outputs, jnp.float32))


def distribution(spec, outputs):
  return _distribution(_head(spec), jnp.asarray(outputs, jnp.float32))


def logits_of(*probs: float) -> np.ndarray:
  """Logits whose softmax is `probs` (which sum to 1)."""
  return np.log(np.asarray(probs, np.float32))


def close(actual, expected, tol: float = 1e-5) -> None:
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol)


Q3 = logits_of(0.2, 0.35, 0.45)  # a 3-bin prediction used by most hand cases
Q4 = logits_of(0.1, 0.4, 0.3, 0.2)


# ------------------------------------------------------------------------------------------ hand-computed cases

def test_dex_bins_expectation_median_and_nearest_bin_targets():
  bins3 = {"head": "dex", "num_classes": 3, "bin_values": [0.25, 1, 2]}
  head = age_head(bins3)
  assert head.num_outputs == 3 and head.decoding == "expectation"
  close(decode(head, Q3), 0.2 * 0.25 + 0.35 * 1 + 0.45 * 2)  # 1.3
  close(decode(bins3 | {"decode": "median"}, Q3), 1.0)  # CDF 0.2, 0.55, 1.0: the second bin's age
  # Nearest bins: 0.5 -> 0.25 (bin 0), 1.7 -> 2 (bin 2), 0.625 is halfway between 0.25 and 1 -> the lower bin.
  close(loss(head, [Q3] * 3, [0.5, 1.7, 0.625]), [-math.log(0.2), -math.log(0.45), -math.log(0.2)])
  # Default bins 0..K-1 round half to even, as DEX's Caffe labels: 1.5 -> 2, 0.5 -> 0; ages past the ends clip.
  default = {"head": "dex", "num_classes": 3}
  close(loss(default, [Q3] * 4, [1.5, 0.5, -3.0, 7.0]), [0.798508, 1.609438, 1.609438, 0.798508])
  close(decode(default, Q3), 1.25)
  # 4 bins, p = 0.1, 0.3, 0.4, 0.2 (CDF 0.1, 0.4, 0.8, 1): the median is the third bin's age.
  close(decode({"head": "dex", "num_classes": 4, "bin_values": [0.25, 1, 2, 3], "decode": "median"},
               logits_of(0.1, 0.3, 0.4, 0.2)), 2.0)
  median = {"head": "dex", "num_classes": 3, "decode": "median"}
  close(decode(median, [logits_of(0.45, 0.1, 0.45), [0.0, 0.0, -np.inf]]), [1.0, 0.0])  # CDF 0.45, 0.55; 0.5 exactly


def test_dex_any_bin_count_like_dlibs_81_bins():
  head = age_head({"head": "dex", "num_classes": 81, "bin_values": [0.25] + list(range(1, 81))})
  z = np.full((2, 81), -30.0, np.float32)
  z[0, 0] = z[1, 40] = 30.0  # all mass on bins 0 and 40
  close(decode(head, z), [0.25, 40.0])
  # 0.4 is 0.15 from 0.25 and 0.6 from 1 (bin 0); 0.7 is 0.45 from 0.25 and 0.3 from 1 (bin 1).
  close(loss(head, np.zeros((2, 81)), [0.4, 0.7]), [math.log(81)] * 2)
  grads = jax.jit(jax.grad(lambda z: head.loss(z, jnp.array([0.4, 0.7])).sum()))(jnp.zeros((2, 81)))
  assert int(jnp.argmin(grads[0])) == 0 and int(jnp.argmin(grads[1])) == 1


def test_regression_l1_and_l2():
  out = [[31.0], [20.0]]
  close(loss({"head": "regression"}, out, [28.0, 22.5]), [3.0, 2.5])
  close(loss({"head": "regression", "loss_options": {"norm": "l2"}}, out, [28.0, 22.5]), [9.0, 6.25])
  close(decode({"head": "regression"}, out), [31.0, 20.0])


def test_dldl_and_dldl_v2_hand_case():
  # y = 1, bins 0, 1, 2, sigma = 1: g = (e^-1/2, 1, e^-1/2) / (1 + 2 e^-1/2) = (0.274069, 0.451863, 0.274069);
  # KL(g || Q3) = 0.274069 ln(0.274069/0.2) + 0.451863 ln(0.451863/0.35) + 0.274069 ln(0.274069/0.45) = 0.065872.
  dldl = {"head": "dldl", "num_classes": 3, "loss_options": {"sigma": 1.0}}
  close(loss(dldl, Q3, 1.0), 0.065872)
  # v2 adds lambda |E - y|, E = 0.35 + 0.9 = 1.25: 0.065872 + 0.25 (lambda 1), + 0.5 (lambda 2).
  close(loss(dldl | {"head": "dldl_v2"}, Q3, 1.0), 0.315872)
  close(loss(dldl | {"head": "dldl_v2", "loss_options": {"sigma": 1.0, "lambda_l1": 2.0}}, Q3, 1.0), 0.565872)
  # A perfect fit costs nothing: the prediction equal to the target distribution.
  close(loss(dldl, logits_of(0.274068619, 0.451862762, 0.274068619), 1.0), 0.0)
  assert dict(age_head({"head": "dldl"}).options) == {"sigma": 2.0}
  assert dict(age_head({"head": "dldl_v2"}).options) == {"sigma": 2.0, "lambda_l1": 1.0}


def test_mean_variance_hand_case_with_the_published_lambdas():
  # y = 1: CE -ln 0.35 = 1.049822; mean m = 1.25, 0.2 * (0.25^2 / 2) = 0.00625;
  # variance 0.2 * 1.25^2 + 0.35 * 0.25^2 + 0.45 * 0.75^2 = 0.5875, 0.05 * 0.5875 = 0.029375. Total 1.085447.
  head = age_head({"head": "mean_variance", "num_classes": 3})
  assert dict(head.options) == {"lambda_mean": 0.2, "lambda_variance": 0.05}
  close(loss(head, Q3, 1.0), 1.085447)
  close(loss({"head": "mean_variance", "num_classes": 3, "loss_options": {"lambda_variance": 0.0}}, Q3, 1.0),
        1.056072)


def test_sord_hand_cases():
  # y = 1, bins 0..3, phi = |r_t - r_i|: s = softmax(-1, 0, -1, -2) = (0.196612, 0.534447, 0.196612, 0.072329);
  # KL(s || Q4) = sum s ln(s / q) = 0.131143.
  close(loss({"head": "sord", "num_classes": 4}, Q4, 1.0), 0.131143)
  # y = 1.5, phi squared: -(2.25, 0.25, 0.25, 2.25) -> s = (a, b, b, a), a = 1 / (2 + 2e^2) = 0.059601,
  # b = e^2 / (2 + 2e^2) = 0.440399; KL(s || Q4) = 0.108442.
  close(loss({"head": "sord", "num_classes": 4, "loss_options": {"phi": "squared"}}, Q4, 1.5), 0.108442)


def test_coral_hand_case_and_rank_consistent_distribution():
  # K = 3 ranks, z = (ln 3, -ln 3): P(r > 0) = 0.75, P(r > 1) = 0.25.
  z = np.log(np.array([3.0, 1 / 3], np.float32))
  head = age_head({"head": "coral", "num_classes": 3})
  assert head.num_outputs == 2 and head.decoding == "median"
  # rank 1, levels (1, 0): -ln 0.75 - ln 0.75 = 0.575364; ranks 0 and 2: -ln 0.25 - ln 0.75 = 1.673976.
  close(loss(head, [z] * 3, [1.0, 0.0, 2.0]), [0.575364, 1.673976, 1.673976])
  close(loss({"head": "coral", "num_classes": 3, "loss_options": {"mean_over_tasks": True}}, z, 1.0), 0.575364 / 2)
  close(decode(head, z), 1.0)  # one P(r > k) above 0.5
  close(decode({"head": "coral", "num_classes": 3, "decode": "expectation"}, z), 1.0)  # 0.75 + 0.25
  probs, bins = distribution(head, z)
  close(probs, [0.25, 0.5, 0.25])
  close(bins, [0, 1, 2])
  # Biases out of order (0.25 then 0.75): the sorted sigmoids give the same count and distribution.
  close(decode(head, z[::-1]), 1.0)
  close(distribution(head, z[::-1])[0], [0.25, 0.5, 0.25])


def test_corn_hand_case():
  # K = 3, z = (ln 3, ln 1/4): P(r > 0) = 0.75, P(r > 1 | r > 0) = 0.2, so P(r > 1) = 0.15; P(r) = (0.25, 0.6, 0.15).
  z = np.log(np.array([3.0, 0.25], np.float32))
  head = age_head({"head": "corn", "num_classes": 3})
  # rank 0 trains task 0 only (label 0): -ln 0.25 = 1.386294; rank 1: -ln 0.75 - ln 0.8 = 0.510826;
  # rank 2: -ln 0.75 - ln 0.2 = 1.897120.
  close(loss(head, [z] * 3, [0.0, 1.0, 2.0]), [1.386294, 0.510826, 1.897120])
  close(distribution(head, z)[0], [0.25, 0.6, 0.15])
  close(decode(head, z), 1.0)
  close(decode({"head": "corn", "num_classes": 3, "decode": "expectation"}, z), 0.9)  # 0.75 + 0.15
  # Ranks carry bin ages too: 0.25 + 0.75 (1 - 0.25) + 0.15 (2 - 1) = 0.25 * 0.25 + 0.6 * 1 + 0.15 * 2.
  close(decode({"head": "corn", "num_classes": 3, "bin_values": [0.25, 1, 2], "decode": "expectation"}, z), 0.9625)


def test_distributions_sum_to_one_and_give_an_sd():
  heads = {kind: age_head({"head": kind, "num_classes": 7}) for kind in AGE_KINDS if kind != "regression"}
  zs = {kind: np.random.default_rng(1).normal(size=(5, h.num_outputs)).astype(np.float32) * 3
        for kind, h in heads.items()}
  out = jax.jit(lambda zs: {k: (heads[k].distribution(z), heads[k].decode(z)) for k, z in zs.items()})(zs)
  for kind, ((probs, bins), ages) in out.items():
    assert probs.shape == (5, 7) and bool(jnp.all(probs >= -1e-7)), kind
    close(probs.sum(-1), np.ones(5))
    if heads[kind].decoding == "expectation":
      close(probs @ bins, ages)
    sd = np.sqrt(np.sum(probs * (bins - (probs @ bins)[:, None]) ** 2, -1))
    assert np.all(np.isfinite(sd)) and np.all(sd > 0), kind
  close(age_distribution(zs["sord"], {"head": "sord", "num_classes": 7})[0], out["sord"][0][0])  # spec level


# ------------------------------------------------------------------------------------------- coral-pytorch parity

@pytest.fixture(scope="module")
def coral_pytorch():
  return pytest.importorskip("coral_pytorch", reason="coral-pytorch (requirements-port.txt) is not installed")


def _random_cases(num_ranks: int, n: int = 48):
  rng = np.random.default_rng(num_ranks)
  logits = (rng.normal(size=(n, num_ranks - 1)) * 2).astype(np.float32)
  labels = rng.integers(0, num_ranks, n)
  labels[:2] = (0, num_ranks - 1)  # both ends
  return logits, labels


@pytest.mark.parametrize("num_ranks", [2, 5, 101])
def test_coral_and_corn_match_coral_pytorch(coral_pytorch, num_ranks):
  import torch
  from coral_pytorch.dataset import corn_label_from_logits, levels_from_labelbatch, proba_to_label
  from coral_pytorch.losses import coral_loss, corn_loss

  logits, labels = _random_cases(num_ranks)  # random logits: CORAL's out of rank order too
  t_logits, t_labels = torch.tensor(logits), torch.tensor(labels)
  levels = levels_from_labelbatch(t_labels, num_ranks)
  np.testing.assert_array_equal(rank_levels(jnp.asarray(labels), num_ranks), levels.numpy())
  coral = {"head": "coral", "num_classes": num_ranks}
  close(loss(coral, logits, labels), coral_loss(t_logits, levels, reduction=None).numpy())
  np.testing.assert_array_equal(decode(coral, logits), proba_to_label(torch.sigmoid(t_logits)).numpy())
  # corn_loss divides the batch's sum by its (example, task) pairs: rank r takes part in tasks 0..min(r, K-2).
  for batch in (slice(0, 48), slice(7, 8)):
    ours = np.asarray(loss({"head": "corn", "num_classes": num_ranks}, logits[batch], labels[batch]))
    pairs = np.minimum(labels[batch] + 1, num_ranks - 1).sum()
    close(ours.sum() / pairs, corn_loss(t_logits[batch], t_labels[batch], num_ranks).item())
  np.testing.assert_array_equal(decode({"head": "corn", "num_classes": num_ranks}, logits),
                                corn_label_from_logits(t_logits).numpy())


def test_coral_head_module_matches_coral_layer(coral_pytorch):
  import torch
  from coral_pytorch.layers import CoralLayer

  torch.manual_seed(0)
  layer = CoralLayer(size_in=6, num_classes=5)
  module = head_module({"head": "coral", "num_classes": 5})
  params = module.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  close(params["bias"], layer.coral_bias.detach().numpy())  # preinit_bias: (4, 3, 2, 1) / 4
  params = {"fc": {"kernel": jnp.asarray(layer.coral_weights.weight.detach().numpy().T)}, "bias": params["bias"]}
  x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  close(module.apply({"params": params}, jnp.asarray(x)), layer(torch.tensor(x)).detach().numpy())


# -------------------------------------------------------------------------------- training, jit, vmap, gradients

TRAINED = {
    "dex": {"head": "dex"}, "regression-l1": {"head": "regression"},
    "regression-l2": {"head": "regression", "loss_options": {"norm": "l2"}}, "coral": {"head": "coral"},
    "corn": {"head": "corn"}, "dldl": {"head": "dldl"}, "dldl_v2": {"head": "dldl_v2"},
    "mean_variance": {"head": "mean_variance"}, "sord": {"head": "sord"},
}


def test_every_head_trains():
  """Adam steps on each head's own (linear) module over fixed features lower its loss and MAE.

  All heads train in one jitted program (one compilation): their parameters are disjoint, so the gradient of the
  summed losses is each head's own gradient, and Adam is elementwise.
  """
  k = 11
  specs = {n: s | {"num_classes": k, "regression_hidden": (8, 8), "init_age": 5.0} for n, s in TRAINED.items()}
  heads = {n: age_head(s) for n, s in specs.items()}
  modules = {n: head_module(s) for n, s in specs.items()}
  decoders = heads | {"dex-median": age_head(specs["dex"] | {"decode": "median"})}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 6)), jnp.float32)
  ages = jnp.clip(jnp.round(5.0 + 2.0 * x[:, 0] - 1.5 * x[:, 1]), 0, k - 1)
  opt = optax.adam(0.05)

  def outputs(p):
    return {n: m.apply({"params": p[n]}, x) for n, m in modules.items()}

  def losses(p):
    return {n: heads[n].loss(out, ages).mean() for n, out in outputs(p).items()}

  def maes(p):
    out = outputs(p)
    return {n: jnp.abs(h.decode(out[n.split("-median")[0]]) - ages).mean() for n, h in decoders.items()}

  @jax.jit
  def run(key):
    p = {n: m.init(key, x)["params"] for n, m in modules.items()}
    shapes = {n: o.shape for n, o in outputs(p).items()}

    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda p: sum(losses(p).values()))(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (q, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=150)
    return shapes, losses(p), maes(p), losses(q), maes(q)

  shapes, loss0, mae0, loss1, mae1 = run(jax.random.key(1, impl="rbg"))  # rbg: XLA:CPU compiles threefry slowly
  for n, head in heads.items():
    assert shapes[n] == (64, head.num_outputs), n
    assert np.isfinite(float(loss1[n])) and float(loss1[n]) < 0.7 * float(loss0[n]), (n, loss0[n], loss1[n])
  for n in decoders:
    assert float(mae1[n]) < 0.6 * float(mae0[n]) and float(mae1[n]) < 1.0, (n, mae0[n], mae1[n])


def test_heads_are_vmap_safe_stable_and_static_jit_arguments():
  """Per head: losses and ages vmapped over trials equal the lone ones, gradients flow, extreme logits stay finite.

  All heads are checked in one jitted program (one compilation).
  """
  trials, n = 4, 4
  ages = jnp.asarray(np.tile([0.0, 3.3, 10.0, 6.0], trials), jnp.float32)
  heads = {kind: age_head({"head": kind, "num_classes": 11}) for kind in AGE_KINDS}
  zs = {}
  for kind, head in heads.items():
    again = age_head({"head": kind, "num_classes": 11})
    assert head == again and hash(head) == hash(again)  # usable as a static jit argument
    z = np.random.default_rng(2).normal(size=(trials * n, head.num_outputs)).astype(np.float32)
    # The last trial: rows of +-1e4 logits, which log-softmax / log-sigmoid keep finite (no log(0), no inf - inf).
    z[-n:] = np.where(np.arange(head.num_outputs) % 2 == 0, 1e4, -1e4) * np.array([[1.0], [-1.0], [1.0], [-1.0]])
    zs[kind] = z

  def check(head, z):
    value, vjp = jax.vjp(lambda z: head.loss(z, ages), z)  # per example, so one flat batch = the lone trials
    (grad,) = vjp(jnp.ones_like(value))
    by_trial = jax.vmap(head.loss)(z.reshape(trials, n, -1), ages.reshape(trials, n)).reshape(-1)
    decoded, decoded_by_trial = head.decode(z), jax.vmap(head.decode)(z.reshape(trials, n, -1)).reshape(-1)
    return value, by_trial, decoded, decoded_by_trial, grad

  results = jax.jit(lambda zs: {kind: check(heads[kind], z) for kind, z in zs.items()})(zs)
  for kind, (value, by_trial, decoded, decoded_by_trial, grad) in results.items():
    close(by_trial, value)
    close(decoded_by_trial, decoded)
    assert bool(jnp.all(jnp.isfinite(value))) and bool(jnp.all(jnp.isfinite(grad))), kind
    assert bool(jnp.all(jnp.isfinite(decoded))), kind
    assert float(jnp.abs(grad[:n]).sum()) > 0, kind


# ----------------------------------------------------------------------------------- the old API, errors, specs

def test_old_string_api_is_unchanged_for_dex_and_regression():
  z = jnp.asarray(np.random.default_rng(3).normal(size=(8, 101)) * 2, jnp.float32)
  ages = jnp.array([0.0, 0.5, 1.5, 2.5, 37.2, 99.6, 100.0, 130.0])

  @jax.jit
  def both(z, ages):
    old = (jax.nn.softmax(z, axis=-1) @ jnp.arange(101, dtype=jnp.float32),  # the code callers ran until now
           optax.softmax_cross_entropy_with_integer_labels(z, jnp.clip(jnp.round(ages), 0, 100).astype(jnp.int32)),
           z[:, 0] * 10, jnp.abs(z[:, 0] * 10 - ages))
    new = (predict_age(z, "dex"), age_loss(z, ages, "dex"), predict_age(z[:, :1] * 10, "regression"),
           age_loss(z[:, :1] * 10, ages, "regression"))
    heads = (age_head({"head": "dex"}).loss(z, ages), age_head({"head": "dex", "bin_values": list(range(101))})
             .loss(z, ages), age_head({"head": "dex"}).decode(z))
    return old, new, heads

  old, new, heads = both(z, ages)
  for a, b in zip(old, new):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(heads, (old[1], old[1], old[0])):
    np.testing.assert_array_equal(a, b)
  # The string API serves every age kind with default options, K from the outputs.
  close(age_loss(jnp.log(jnp.array([3.0, 1 / 3])), jnp.array(1.0), "coral"), 0.575364)


def test_make_head_builds_any_bin_count_and_its_outputs():
  x = jnp.zeros((2, 5))
  cases = (("dex", 7, 7), ("dex", 81, 81), ("classes", 10, 10), ("sord", 4, 4), ("coral", 6, 5), ("corn", 6, 5),
           ("regression", 101, 1))
  modules = [make_head(kind, k, regression_hidden=(4, 4)) for kind, k, _ in cases]
  shapes = jax.jit(lambda key: [m.apply(m.init(key, x), x).shape for m in modules])(jax.random.key(0, impl="rbg"))
  assert shapes == [(2, n) for _, _, n in cases]
  assert make_head("dex").num_classes == 101


def test_classes_head_and_bad_specs_are_one_line_errors():
  z = jnp.zeros((2, 1000))
  for call in (lambda: age_head({"head": "classes", "num_classes": 1000}), lambda: predict_age(z, "classes"),
               lambda: age_loss(z, jnp.zeros(2), "classes"), lambda: age_distribution(z, {"head": "classes"})):
    with pytest.raises(ConfigError, match="'classes' head") as e:
      call()
    assert "\n" not in str(e.value)
  bad = [
      ({"head": "softmax"}, "unknown head kind 'softmax'"),
      ({"head": "dex", "num_classes": 3, "bin_values": [0, 1]}, "bin_values .* 2 values but num_classes is 3"),
      ({"head": "dex", "num_classes": 3, "bin_values": [0, 2, 1]}, "strictly increasing"),
      ({"head": "dex", "num_classes": 3, "bin_values": "abc"}, "list of 3 numbers"),
      ({"head": "dldl", "loss_options": {"sgima": 2}}, r"loss_options.sgima .* 'dldl' head; its options: sigma"),
      ({"head": "dex", "loss_options": {"sigma": 2}}, "its options: none"),
      ({"head": "dldl", "loss_options": {"sigma": 0}}, r"loss_options.sigma .* > 0"),
      ({"head": "mean_variance", "loss_options": {"lambda_mean": -1}}, r"lambda_mean .* >= 0"),
      ({"head": "sord", "loss_options": {"phi": "cubic"}}, "phi .* one of"),
      ({"head": "coral", "loss_options": {"mean_over_tasks": 1}}, "mean_over_tasks .* one of"),
      ({"head": "regression", "decode": "median"}, "'regression' head predicts one age"),
      ({"head": "dex", "decode": "mode"}, "decode must be one of expectation, median"),
      ({"head": "coral", "num_classes": 1}, "num_classes .* >= 2"),
  ]
  for spec, message in bad:
    with pytest.raises(ConfigError, match=message):
      age_head(spec)
  with pytest.raises(ConfigError, match="bin_values"):
    head_module({"head": "dex", "num_classes": 3, "bin_values": [0, 1]})  # build_model validates through this
  with pytest.raises(ConfigError, match="distribution"):
    age_distribution(jnp.zeros((1, 1)), {"head": "regression"})
  assert age_head({"head": "regression", "num_classes": 101}).num_outputs == 1  # K is unused there
  assert all(age_head({"head": k}).decoding == "median" for k in ORDINAL_KINDS)
