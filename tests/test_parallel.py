"""Mesh, shardings and the distributed environment, on 8 fake CPU devices in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agejax.errors import ConfigError
from agejax.parallel import distributed

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh process so the 8 fake devices do not leak into other tests; prints what it observed.
_SCRIPT = textwrap.dedent("""
  import json
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  from agejax.errors import ConfigError
  from agejax import parallel as par

  out = {"initialized": par.maybe_initialize(), "again": par.maybe_initialize()}
  out["info"] = par.process_info()
  out["main"] = par.is_main_process()
  out["shapes"] = {k: dict(par.make_mesh(**kw).shape) for k, kw in
                   {"default": {}, "data2": {"data": 2}, "t2d2": {"trial": 2, "data": 2}}.items()}
  out["errors"] = {}
  for k, kw in {"data3": {"data": 3}, "trial3": {"trial": 3}, "zero": {"data": 0}}.items():
    try:
      par.make_mesh(**kw)
      out["errors"][k] = None
    except ConfigError as e:
      out["errors"][k] = str(e)

  mesh8, mesh3, mesh42 = par.make_mesh(), par.make_mesh(trial=3, devices=jax.devices()[:3]), par.make_mesh(data=2)
  out["pad"] = [par.pad_trials(32, mesh8), par.pad_trials(32, mesh3), par.pad_trials(1, mesh8),
                par.pad_trials(30, mesh42)]

  tree = par.shard_tree({"w": np.arange(32 * 5.0).reshape(32, 5), "b": np.zeros((32,))}, par.trial_sharding(mesh8))
  w = tree["w"]
  out["trial_rows"] = sorted([s.index[0].start, s.index[0].stop] for s in w.addressable_shards)
  out["trial_devices"] = len({s.device for s in w.addressable_shards})
  out["trial_values_ok"] = all(np.array_equal(np.asarray(s.data), np.asarray(w)[s.index]) for s in w.addressable_shards)
  rep = par.shard_tree(np.ones((3, 4)), par.replicated(mesh8))
  out["replicated_shard_shapes"] = sorted({tuple(s.data.shape) for s in rep.addressable_shards})
  nolead = par.shard_tree(np.ones((3, 4)), par.trial_sharding(mesh8, leading_trial=False))
  out["nolead_shard_shapes"] = sorted({tuple(s.data.shape) for s in nolead.addressable_shards})
  xb = par.shard_tree(np.ones((8, 6, 3)), par.batch_sharding(mesh42))
  out["batch_shard_shapes"] = sorted({tuple(s.data.shape) for s in xb.addressable_shards})

  # A per-trial linear-regression gradient step: sharded over (trial, data) vs. one device, no sharding.
  def step(w, x, y):
    def loss(w, x, y):
      return jnp.mean((x @ w - y) ** 2)
    g = jax.vmap(jax.grad(loss))(w, x, y)
    return w - 0.1 * g, jax.vmap(loss)(w, x, y)

  rng = np.random.default_rng(0)
  n, b, d = 32, 6, 5
  w0, x0, y0 = rng.normal(size=(n, d)), rng.normal(size=(n, b, d)), rng.normal(size=(n, b))
  w0, x0, y0 = (a.astype(np.float32) for a in (w0, x0, y0))
  ref_w, ref_l = jax.jit(step)(*jax.device_put((w0, x0, y0), jax.devices()[0]))
  errs, out_shardings = {}, {}
  for name, mesh in {"t8": mesh8, "t4d2": mesh42, "t3pad": mesh3}.items():
    n_pad = par.pad_trials(n, mesh)
    pad = lambda a: np.concatenate([a, np.zeros((n_pad - n,) + a.shape[1:], a.dtype)])
    ts, bs = par.trial_sharding(mesh), par.batch_sharding(mesh)
    f = jax.jit(step, in_shardings=(ts, bs, bs), out_shardings=(ts, ts))
    args = par.shard_tree((pad(w0), pad(x0), pad(y0)), (ts, bs, bs))
    new_w, l = f(*args)
    out_shardings[name] = [str(new_w.sharding.spec), len(new_w.sharding.device_set)]
    errs[name] = max(float(np.abs(np.asarray(new_w)[:n] - ref_w).max()), float(np.abs(np.asarray(l)[:n] - ref_l).max()))
  out["errs"], out["out_shardings"] = errs, out_shardings

  sl = par.process_slices(par.batch_sharding(mesh42), (8, 6, 3))
  out["process_slices"] = [[s.start, s.stop] for s in sl]
  full = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8, 6, 3)
  g = par.global_batch_from_local(full[sl], mesh42, P("trial", "data"))
  out["global_ok"] = bool(np.array_equal(np.asarray(g), full)) and g.sharding.spec == P("trial", "data")
  print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def observed() -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("AGEJAX_")}
  env.update(JAX_PLATFORMS="cpu", AGEJAX_CPU_DEVICES="8", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


def test_cpu_devices_from_env_without_distributed(observed):
  assert observed["initialized"] is False and observed["again"] is False
  info = observed["info"]
  assert (info["device_count"], info["local_device_count"], info["process_count"]) == (8, 8, 1)
  assert info["platform"] == "cpu" and observed["main"] is True


def test_mesh_shapes_and_errors(observed):
  assert observed["shapes"] == {
      "default": {"trial": 8, "data": 1},
      "data2": {"trial": 4, "data": 2},
      "t2d2": {"trial": 2, "data": 2},
  }
  assert "data=3" in observed["errors"]["data3"] and "8 devices" in observed["errors"]["data3"]
  assert "does not divide" in observed["errors"]["trial3"]
  assert observed["errors"]["zero"] is not None


def test_pad_trials(observed):
  assert observed["pad"] == [32, 33, 8, 32]


def test_trial_axis_spread_over_devices(observed):
  assert observed["trial_devices"] == 8
  assert observed["trial_rows"] == [[i * 4, i * 4 + 4] for i in range(8)]
  assert observed["trial_values_ok"]
  assert observed["replicated_shard_shapes"] == [[3, 4]]
  assert observed["nolead_shard_shapes"] == [[3, 4]]
  assert observed["batch_shard_shapes"] == [[2, 3, 3]]


def test_sharded_step_matches_unsharded(observed):
  for name, err in observed["errs"].items():
    assert err < 1e-5, (name, err)
  assert observed["out_shardings"]["t8"][1] == 8
  assert observed["out_shardings"]["t3pad"][1] == 3
  assert "trial" in observed["out_shardings"]["t4d2"][0]


def test_global_batch_from_local_single_process(observed):
  assert observed["process_slices"] == [[0, 8], [0, 6], [0, 3]]
  assert observed["global_ok"]


def _set_env(monkeypatch, **values):
  for k in ("AGEJAX_COORDINATOR", "AGEJAX_NUM_PROCESSES", "AGEJAX_PROCESS_ID", "AGEJAX_DISTRIBUTED",
            "AGEJAX_LOCAL_DEVICE_IDS"):
    monkeypatch.delenv(k, raising=False)
  for k, v in values.items():
    monkeypatch.setenv(k, v)


def test_init_kwargs_from_env(monkeypatch):
  _set_env(monkeypatch)
  assert distributed._init_kwargs() is None
  _set_env(monkeypatch, AGEJAX_DISTRIBUTED="auto")
  assert distributed._init_kwargs() == {}
  _set_env(monkeypatch, AGEJAX_COORDINATOR="10.0.0.1:1234", AGEJAX_NUM_PROCESSES="4", AGEJAX_PROCESS_ID="3",
           AGEJAX_LOCAL_DEVICE_IDS="0,1", AGEJAX_DISTRIBUTED="auto")
  assert distributed._init_kwargs() == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, local_device_ids=[0, 1])


@pytest.mark.parametrize("values, match", [
    (dict(AGEJAX_COORDINATOR="h:1", AGEJAX_NUM_PROCESSES="2"), "AGEJAX_PROCESS_ID missing"),
    (dict(AGEJAX_COORDINATOR="h:1", AGEJAX_NUM_PROCESSES="2", AGEJAX_PROCESS_ID="2"), "outside"),
    (dict(AGEJAX_COORDINATOR="h:1", AGEJAX_NUM_PROCESSES="two", AGEJAX_PROCESS_ID="0"), "not an integer"),
    (dict(AGEJAX_DISTRIBUTED="yes please"), "expected 'auto'"),
])
def test_init_kwargs_errors(monkeypatch, values, match):
  _set_env(monkeypatch, **values)
  with pytest.raises(ConfigError, match=match):
    distributed._init_kwargs()


def test_cpu_device_count_precedence(monkeypatch):
  monkeypatch.delenv("AGEJAX_CPU_DEVICES", raising=False)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(distributed, "usable_cores", lambda: 2)
  assert distributed.cpu_device_count() == 2  # auto: one per core
  monkeypatch.setattr(distributed, "usable_cores", lambda: 64)
  assert distributed.cpu_device_count() == distributed.MAX_AUTO_CPU_DEVICES
  assert distributed.cpu_device_count(3) == 3  # the config's mesh.cpu_devices
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert distributed.cpu_device_count(3) is None  # XLA_FLAGS already decides
  monkeypatch.setenv("AGEJAX_CPU_DEVICES", "5")
  assert distributed.cpu_device_count(3) == 5  # the launch environment wins
  monkeypatch.setenv("AGEJAX_CPU_DEVICES", "")  # empty: as if unset
  monkeypatch.delenv("XLA_FLAGS")
  assert distributed.cpu_device_count(3) == 3
  with pytest.raises(ConfigError, match="must be positive"):
    distributed.cpu_device_count(-1)
