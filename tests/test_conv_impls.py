"""The convolution implementations agree, and the per-layer 'auto' plan is measured once and cached."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax.models import conv_tuning
from agejax.models.layers import Conv2D, conv_nhwc, conv_padding


def _values_and_grads(impl, x, w, strides, pads, groups):
  f = lambda x, w: jnp.sum(jnp.sin(conv_nhwc(x, w, strides, pads, groups, impl)))
  return (conv_nhwc(x, w, strides, pads, groups, impl), *jax.grad(f, (0, 1))(x, w))


@pytest.mark.parametrize("groups", [1, "depthwise"])
def test_implementations_equal_lax_values_and_gradients(groups):
  rng = np.random.default_rng(0)
  cases = [(8, 3, 1, "torch"), (7, 3, 2, "tf_same"), (8, 5, 2, "tf_same"), (8, 1, 2, "valid"), (7, 3, 1, "valid")]
  for size, k, s, padding in cases:
    cin = 6
    g = cin if groups == "depthwise" else 1
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin // g, cin)), jnp.float32)
    pads = conv_padding((size, size + 1), (k, k), (s, s), padding)
    ref = _values_and_grads("lax", x, w, (s, s), pads, g)
    for impl in ("canonical", "patches"):
      got = _values_and_grads(impl, x, w, (s, s), pads, g)
      for a, b in zip(ref, got):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()),
                                   err_msg=f"{impl} size={size} k={k} s={s} {padding} groups={g}")


def test_canonical_backward_uses_nhwc_layout():
  # The point of 'canonical': its backward convolutions are plain NHWC x HWIO, reached by explicit
  # transposes (XLA:CPU runs other dimension orders slowly inside loop bodies).
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: conv_nhwc(x, w, (2, 2), [(1, 1)] * 2, impl="canonical").sum()))(w))
  assert "permutation=(3, 1, 2, 0)" in jaxpr
  plain = str(jax.make_jaxpr(jax.grad(lambda w: conv_nhwc(x, w, (2, 2), [(1, 1)] * 2, impl="lax").sum()))(w))
  assert "permutation=(3, 1, 2, 0)" not in plain


def test_tuning_picks_the_fastest_and_caches(tmp_path, monkeypatch):
  monkeypatch.setenv("AGEJAX_CACHE", str(tmp_path))
  sig_a = conv_tuning.signature((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), [(1, 1)] * 2, 1, jnp.float32)
  sig_b = conv_tuning.signature((2, 8, 8, 4), (3, 3, 1, 4), (1, 1), [(1, 1)] * 2, 4, jnp.float32)
  fake = {"lax": 3.0, "canonical": 2.0, "patches": 1.0}
  calls = []

  def measure(sig, impl):
    calls.append((sig, impl))
    return fake[impl]

  plan = conv_tuning.tune_signatures([sig_a, sig_b, sig_a], measure=measure)
  assert plan == {sig_a: "patches", sig_b: "canonical"}  # 'patches' is no candidate for a grouped conv
  assert len(calls) == 5
  cache = json.loads((tmp_path / "conv_impls.json").read_text())
  assert len(cache) == 2
  assert conv_tuning.tune_signatures([sig_a, sig_b], measure=measure) == plan
  assert len(calls) == 5  # the second call measured nothing


class _Net(nn.Module):
  """A stem, a depthwise and a pointwise convolution, all with one implementation."""

  impl: str

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(Conv2D(8, (3, 3), (2, 2), padding="tf_same", impl=self.impl, name="stem")(x))
    x = nn.relu(Conv2D(8, (3, 3), groups=8, impl=self.impl, name="dw")(x))
    return Conv2D(4, (1, 1), padding="valid", impl=self.impl, name="pw")(x).mean((1, 2))


def test_auto_model_records_every_conv_and_follows_the_plan(tmp_path, monkeypatch):
  monkeypatch.setenv("AGEJAX_CACHE", str(tmp_path))
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 16, 16, 3)), jnp.float32)
  model = _Net("auto")
  variables = model.init(jax.random.key(0), x)
  sigs = conv_tuning.model_signatures(model, variables, x.shape)
  assert len(sigs) == 3 and [s[4] for s in sigs] == [1, 8, 1]
  ref = _Net("lax").apply(variables, x)
  conv_tuning.set_plan({s: "canonical" for s in sigs})
  with conv_tuning.recording() as traced:  # the plan is read when the model is traced
    got = jax.jit(model.apply)(variables, x)
  assert set(traced) == set(sigs)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  counts = conv_tuning.tune_model(model, variables, x.shape)  # real measurements on the three shapes
  assert sum(counts.values()) == 3 and set(counts) <= set(conv_tuning.IMPLS)
  with pytest.raises(ValueError, match="unknown convolution"):
    conv_tuning.set_plan({sigs[0]: "fft"})


def test_plan_file_overrides_timings_and_records_the_plan(tmp_path, monkeypatch):
  monkeypatch.setenv("AGEJAX_CACHE", str(tmp_path / "cache"))
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)
  model = _Net("auto")
  variables = model.init(jax.random.key(0), x)
  sigs = conv_tuning.model_signatures(model, variables, x.shape)
  plan_file = tmp_path / "run" / "conv_plan.json"
  conv_tuning.write_plan_file(str(plan_file), {sigs[0]: "patches", sigs[1]: "lax"})
  # The cache says 'lax' is fastest everywhere; the run's own file must win for the layers it names.
  cache = {conv_tuning._cache_key(s): {"seconds": {"lax": 1.0, "canonical": 2.0, "patches": 3.0}} for s in sigs}
  (tmp_path / "cache").mkdir()
  (tmp_path / "cache" / "conv_impls.json").write_text(json.dumps(cache))
  counts = conv_tuning.tune_model(model, variables, x.shape, plan_file=str(plan_file))
  assert counts == {"patches": 1, "lax": 2}
  assert conv_tuning.current_plan()[sigs[0]] == "patches"
  assert conv_tuning.read_plan_file(str(plan_file)) == {sigs[0]: "patches", sigs[1]: "lax", sigs[2]: "lax"}
  plan_file.write_text('{"plan": {"[1, 2]": "lax"}}')
  with pytest.raises(ValueError, match="conv_plan.json: not a convolution plan"):
    conv_tuning.read_plan_file(str(plan_file))
