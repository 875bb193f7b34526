"""`python -m agejax.bench --quick` runs end to end and reports a consistent JSON."""

import json
import math
import os
import subprocess
import sys

import pytest

from agejax import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_bench_json(tmp_path):
  out = tmp_path / "x.json"
  # One conv implementation keeps it to three compilations; unoptimised XLA compiles faster still.
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
         "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-m", "agejax.bench", "--quick", "--no-torch", "--conv-impls", "lax",
                         "--out", str(out)], cwd=REPO, env={**env, "AGEJAX_CACHE": str(tmp_path / "cache")},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(proc.stdout) == report  # the same object on stdout and in --out

  assert {"device", "versions", "settings", "flops_per_step", "results", "best", "torch",
          "ratio_best_jax_vs_torch"} <= set(report)
  assert {"backend", "kind", "name"} <= set(report["device"])
  assert report["versions"]["jax"]
  settings = report["settings"]
  assert settings["quick"] and settings["trials"] >= 2
  assert report["torch"] is None and report["ratio_best_jax_vs_torch"] is None

  results = report["results"]
  assert [(r["strategy"], r["conv_impl"]) for r in results] == [("vmap", "lax"), ("map", "lax"), ("loop", "lax")]
  base = next(r for r in results if r["strategy"] == "loop")
  images = settings["trials"] * settings["steps_per_chunk"] * settings["batch"]
  devices = report["device"]["count"]  # CPU devices: one per core by default, as the engine makes them
  for r in results:
    assert "error" not in r, r
    assert r["devices"] == (devices if settings["trials"] >= devices else 1)
    assert _positive(r["images_per_s"]) and _positive(r["chunk_s"]) and _positive(r["compile_s"])
    assert r["images_per_s"] == pytest.approx(images / r["chunk_s"], rel=1e-9)
    assert r["chunk_s"] == min(r["chunk_s_all"]) and len(r["chunk_s_all"]) == settings["repeats"]
    assert r["speedup_vs_loop_lax"] == pytest.approx(r["images_per_s"] / base["images_per_s"], rel=1e-9)
    if r["flops_per_step"] is not None:
      assert _positive(r["flops_per_step"])
      assert r["achieved_flops_per_s"] == pytest.approx(
          r["flops_per_step"] * settings["trials"] * settings["steps_per_chunk"] / r["chunk_s"], rel=1e-9)
  assert base["speedup_vs_loop_lax"] == pytest.approx(1.0)
  assert report["best"]["images_per_s"] == max(r["images_per_s"] for r in results)
  # No 'auto' row: the chosen combination is the best one; the hand-written sequential baseline is timed.
  assert report["chosen"] == report["best"]
  seq = report["sequential"]
  assert seq["strategy"] == "sequential" and _positive(seq["images_per_s"])
  assert seq["images_per_s"] == pytest.approx(images / seq["chunk_s"], rel=1e-9)
  assert report["ratio_chosen_vs_sequential"] == pytest.approx(report["chosen"]["images_per_s"] / seq["images_per_s"])
  mem = report["memory"]
  est = mem["estimate_per_trial"]
  assert est["total"] == sum(est[k] for k in ("params", "grads", "optimizer", "batch_stats", "activations"))
  assert est["params"] > 0 and est["activations"] > 0
  if mem["xla_one_trial_step_bytes"]:  # the estimate is within a small factor of XLA's own analysis
    assert 0.2 < est["total"] / mem["xla_one_trial_step_bytes"] < 5
  assert report["peak_flops_per_s"] is None  # unknown for a CPU unless --peak-tflops is given


def test_flops_of_handles_backend_shapes():
  class Compiled:
    def __init__(self, cost):
      self.cost = cost

    def cost_analysis(self):
      if isinstance(self.cost, Exception):
        raise self.cost
      return self.cost

  assert bench.flops_of(Compiled({"flops": 12.0})) == 12.0
  assert bench.flops_of(Compiled([{"flops": 7.0, "bytes accessed": 1.0}])) == 7.0
  for cost in ({}, [], None, {"bytes accessed": 3.0}, {"flops": -1.0}, NotImplementedError("no")):
    assert bench.flops_of(Compiled(cost)) is None


def test_parse_args_defaults_and_quick():
  s = bench.parse_args([])
  assert (s.model, s.trials, s.res, s.batch) == ("vgg16_tiny", 32, 64, 8)
  assert s.strategies == ["vmap", "map", "loop"] and s.conv_impls == ["auto", "lax", "canonical", "patches"]
  assert s.torch and s.sequential and s.dtype == "float32"
  q = bench.parse_args(["--quick", "--trials", "3", "--strategies", "loop,vmap", "--torch-threads", "2,1"])
  assert q.trials == 3 and q.steps == bench.QUICK["steps"] and q.strategies == ["loop", "vmap"]
  assert q.torch_threads == [2, 1]
  with pytest.raises(SystemExit):
    bench.parse_args(["--strategies", "pmap"])


def test_peak_flops_table():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert bench.peak_flops("NVIDIA H200", "float32") == 67e12
  assert bench.peak_flops("cpu", "float32") is None
  assert bench.peak_flops("cpu", "float32", override_tflops=2.0) == 2e12


def test_protocol_grid_costs_the_lap_table():
  from agejax.configs import LAP_SOLVER, base_config

  grid = bench.protocol_grid(100.0, "lap")
  batch = base_config().batch_size
  assert [r["n"] for r in grid["sizes"]] == [row[1] for row in LAP_SOLVER]
  assert grid["images"] == sum(t * steps * batch for _, _, t, _, steps in LAP_SOLVER) == sum(
      r["images"] for r in grid["sizes"])
  assert grid["trials"] == sum(row[2] for row in LAP_SOLVER)
  assert grid["est_s"] == pytest.approx(grid["images"] / 100.0) and grid["est_h"] == pytest.approx(grid["est_s"] / 3600)
  assert bench.protocol_grid(None)["est_s"] is None


def test_freeze_bench_reports_the_cache_ratio():
  s = bench.parse_args(["--quick", "--model", "wrn16_8", "--freeze", "backbone", "--no-torch", "--strategies", "loop",
                        "--conv-impls", "lax"])
  report = bench.run_freeze(s)
  rows = {r["inputs"]: r for r in report["results"]}
  assert set(rows) == {"cached", "recompute"} and all("error" not in r for r in rows.values())
  assert report["ratio_cached_vs_recompute"] == pytest.approx(rows["cached"]["images_per_s"]
                                                              / rows["recompute"]["images_per_s"])
  assert report["settings"]["variants"] == 2 and report["cache"]["images"] == 2 * s.pool  # centre x mirror
  assert report["protocol_grid"]["images_per_s"] == rows["cached"]["images_per_s"]
  assert report["memory"]["cache_bytes"] == report["cache"]["bytes"]
  from agejax.errors import ConfigError

  with pytest.raises(ConfigError, match="--freeze='nope'"):
    bench.run_freeze(bench.parse_args(["--quick", "--model", "wrn16_8", "--freeze", "nope", "--conv-impls", "lax"]))


def test_torch_partial_fine_tuning_splits_at_the_flax_stages():
  torch = pytest.importorskip("torch")
  from agejax.models.dlib_resnet import DlibResNet
  from agejax.models.wideresnet import WideResNet

  for model, flax_names, freeze in ((bench.torch_wrn(10, 1, 8, 32, 5), WideResNet(10, 1).stage_names(), "block2_1"),
                                    (bench.torch_dlib(1 / 8, 5), DlibResNet(1 / 8).stage_names(), "block3")):
    assert [name for name, _, _ in model.stages()] == list(flax_names)
    x = torch.rand(2, 3, 64 if freeze == "block3" else 32, 64 if freeze == "block3" else 32)
    model.eval()
    forward, trained = bench.torch_partial(model, freeze)
    with torch.no_grad():
      torch.testing.assert_close(forward(x), model(x))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(not n.startswith(("stem", "blocks.0.")) for n in names) and "fc.weight" in names
    assert {id(p) for p in trained} == {id(p) for p in model.parameters() if p.requires_grad}
  head_only, trained = bench.torch_partial(bench.torch_wrn(10, 1, 8, 32, 5), "backbone")
  assert len(trained) == 2  # fc weight and bias
