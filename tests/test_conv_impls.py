"""The convolution implementations agree, and the per-layer 'auto' plan is measured once, cached, and carried
by the model spec into every layer."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax.configs import tiny_vgg
from agejax.engine import autotune
from agejax.models import build_model
from agejax.models.layers import Conv2D, conv_nhwc, conv_padding, conv_plan, signature, signature_key
from agejax.models.registry import with_conv_plan


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
  sig_a = signature((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), [(1, 1)] * 2, 1, jnp.float32)
  sig_b = signature((2, 8, 8, 4), (3, 3, 1, 4), (1, 1), [(1, 1)] * 2, 4, jnp.float32)
  fake = {"lax": 3.0, "canonical": 2.0, "patches": 1.0}
  calls = []

  def measure(sig, impl):
    calls.append((sig, impl))
    return fake[impl]

  plan = autotune.tune_signatures([sig_a, sig_b, sig_a], measure=measure)
  assert plan == {sig_a: "patches", sig_b: "canonical"}  # 'patches' is no candidate for a grouped conv
  assert len(calls) == 5
  cache = json.loads((tmp_path / "conv_impls.json").read_text())
  assert len(cache) == 2
  assert autotune.tune_signatures([sig_a, sig_b], measure=measure) == plan
  assert len(calls) == 5  # the second call measured nothing


class _Net(nn.Module):
  """A stem, a depthwise and a pointwise convolution, all with one implementation."""

  impl: object  # a name or a plan

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
  sigs = autotune.model_signatures(model, variables, x.shape)
  assert len(sigs) == 3 and [s[4] for s in sigs] == [1, 8, 1]
  ref = _Net("lax").apply(variables, x)
  planned = _Net(conv_plan({s: "canonical" for s in sigs}))  # the plan is the layers' own attribute
  traced = autotune.resolved_impls(planned, variables, x.shape)
  assert set(s for s, _ in traced) == set(sigs) and {i for _, i in traced} == {"canonical"}
  got = jax.jit(planned.apply)(variables, x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  counts = autotune.counts_of(autotune.plan_model(model, variables, x.shape))  # real measurements, three shapes
  assert sum(counts.values()) == 3 and set(counts) <= set(autotune.IMPLS)
  with pytest.raises(ValueError, match="unknown convolution"):
    conv_plan({sigs[0]: "fft"})


def test_plan_file_overrides_timings_and_records_the_plan(tmp_path, monkeypatch):
  monkeypatch.setenv("AGEJAX_CACHE", str(tmp_path / "cache"))
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)
  model = _Net("auto")
  variables = model.init(jax.random.key(0), x)
  sigs = autotune.model_signatures(model, variables, x.shape)
  plan_file = tmp_path / "run" / "conv_plan.json"
  autotune.write_plan_file(str(plan_file), {sigs[0]: "patches", sigs[1]: "lax"})
  # The cache says 'lax' is fastest everywhere; the run's own file must win for the layers it names.
  cache = {autotune._cache_key(s): {"seconds": {"lax": 1.0, "canonical": 2.0, "patches": 3.0}} for s in sigs}
  (tmp_path / "cache").mkdir()
  (tmp_path / "cache" / "conv_impls.json").write_text(json.dumps(cache))
  plan = autotune.plan_model(model, variables, x.shape, plan_file=str(plan_file))
  counts = autotune.counts_of(plan)
  assert counts == {"patches": 1, "lax": 2}
  assert plan[sigs[0]] == "patches"
  assert autotune.read_plan_file(str(plan_file)) == {sigs[0]: "patches", sigs[1]: "lax", sigs[2]: "lax"}
  plan_file.write_text('{"plan": {"[1, 2]": "lax"}}')
  with pytest.raises(ValueError, match="conv_plan.json: not a convolution plan"):
    autotune.read_plan_file(str(plan_file))


def test_plan_travels_in_the_spec_and_keys_the_programs():
  spec = tiny_vgg(width=1 / 32, fc_dim=16, conv_impl="auto")
  model = build_model(spec)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  sigs = autotune.model_signatures(model, variables, x.shape)
  # VGG-16 at 32 px: 13 convolutions, 9 distinct shapes; 'auto' alone computes as the fallback
  assert len(sigs) == 9 and len(autotune.resolved_impls(model, variables, x.shape)) == 13
  assert {i for _, i in autotune.resolved_impls(model, variables, x.shape)} == {"canonical"}
  plan = {s: ("lax", "patches")[i % 2] for i, s in enumerate(sigs[:-1])}  # the last signature is left out
  planned_spec = json.loads(json.dumps(with_conv_plan(spec, plan)))  # as stored in configs and metadata
  assert planned_spec["backbone"]["conv_impl"] == {signature_key(s): i for s, i in plan.items()}
  planned = build_model(planned_spec)
  hash(planned.backbone.conv_impl)  # a tuple: hashable, part of the module's identity
  got = dict(autotune.resolved_impls(planned, variables, x.shape))
  assert got == {**plan, sigs[-1]: "canonical"}
  assert autotune.model_signatures(planned, variables, x.shape) == []  # nothing left to plan
  assert spec["backbone"]["conv_impl"] == "auto"  # the spec given is not changed
  # Different plans, different programs: jit caches cannot mix them up.
  all_lax = build_model(with_conv_plan(spec, dict.fromkeys(sigs, "lax")))
  canonical = build_model(with_conv_plan(spec, dict.fromkeys(sigs, "canonical")))
  grad_jaxpr = lambda m: str(jax.make_jaxpr(jax.grad(lambda v: m.apply(v, x).sum()))(variables))  # noqa: E731
  marker = "permutation=(3, 1, 2, 0)"  # the canonical backward's layout (test_canonical_backward_uses_nhwc_layout)
  assert marker in grad_jaxpr(canonical) and marker not in grad_jaxpr(all_lax)
  with pytest.raises(ValueError, match="unknown convolution implementations"):
    with_conv_plan(spec, {sigs[0]: "fft"})


@pytest.mark.parametrize("arch,backbone,size", [
    ("mobilenet_v2", {"width": 1 / 8}, 32), ("efficientnet_b0", {"width": 1 / 8}, 32),
    ("wrn16_8", {"depth": 10, "widen_factor": 1}, 32), ("dlib_resnet10", {"width": 1 / 8}, 64)])
def test_every_backbone_passes_the_plan_to_its_convolutions(arch, backbone, size):
  spec = {"arch": arch, "head": "dex", "backbone": {**backbone, "conv_impl": "auto"}}
  model = build_model(spec)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  sigs = autotune.model_signatures(model, variables, x.shape)
  calls = autotune.resolved_impls(model, variables, x.shape)
  assert sigs and set(sigs) == {s for s, _ in calls}  # every convolution of the model was 'auto'
  planned = build_model(with_conv_plan(spec, dict.fromkeys(sigs, "lax")))
  assert autotune.resolved_impls(planned, variables, x.shape) == [(s, "lax") for s, _ in calls]


def test_engine_model_carries_the_plan_also_into_a_frozen_tail(tmp_path):
  import ml_collections

  from agejax.engine import features as features_lib
  from agejax.experiments.engines import planned_model
  from agejax.experiments.priors import resolve_prior

  model = {"arch": "wrn16_8", "head": "dex", "backbone": {"depth": 10, "widen_factor": 1, "conv_impl": "auto"}}
  prior = resolve_prior({"name": "w", "model": model}, {"head": "dex", "preprocess": {"scale": 1.0}}, 16, 0)
  cfg = ml_collections.ConfigDict(dict(batch_size=4, data=dict(crop=16)))
  sigs = autotune.model_signatures(prior.model, prior.variables, (4, 16, 16, 3))
  plan_file = str(tmp_path / "conv_plan.json")
  autotune.write_plan_file(plan_file, dict.fromkeys(sigs, "lax"))  # followed as it is: nothing is timed
  whole = planned_model(cfg, prior, None, plan_file)
  assert autotune.resolved_impls(whole, prior.variables, (4, 16, 16, 3)) == [
      (s, "lax") for s, _ in autotune.resolved_impls(prior.model, prior.variables, (4, 16, 16, 3))]
  frozen = features_lib.build_frozen(prior, "block2_1", {"crop": 16, "mirror": True, "random_crop": True}, 16)
  tail = planned_model(cfg, prior, frozen, plan_file)
  calls = autotune.resolved_impls(tail, frozen.tail_variables, (4, *frozen.feature_shape))
  assert calls and {i for _, i in calls} == {"lax"} and {s for s, _ in calls} < set(sigs)
  assert tail.start == frozen.tail.start == "block2_1"
