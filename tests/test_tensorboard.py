"""The study's TensorBoard logs read back with TensorBoard's own reader: runs, tags, steps and values vs results.csv."""

import math
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

from agejax.configs import tiny_vgg
from agejax.experiments.size_loop import TRAIN_LOSS_STEPS
from agejax.main import run_config
from agejax.reports.tables import read_results

SIZES = ((3, 2, 4, 4), (6, 2, 4, 4))  # (n, trials, stepsize, max_iter): chunks of 2 steps, one compiled program


def _config():
  import importlib.util

  spec = importlib.util.spec_from_file_location("demo", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                     "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config("quick,tiny")
  model = dict(tiny_vgg(width=1 / 32, fc_dim=16), head="regression")
  pretrain = dict(data=dict(name="synthetic", pool_size=40, test_size=20, skew=0.8), steps=4, batch_size=8,
                  eval_every=2, stop="converge", val_size=8, patience=5, mode="frozen")  # frozen: compiles faster
  c.priors = [c.priors[0], dict(name="warm", model=model, pretrain=pretrain)]
  c.sizes = SIZES
  c.eval_size_zero, c.log_trial_losses, c.progress = True, True, False
  return c


def _accumulator(path):
  """TensorBoard's reader of one run (every summary as tensors, as its data server reads them), nothing dropped."""
  acc = plugin_event_accumulator.EventAccumulator(str(path), size_guidance={"tensors": 0})
  acc.Reload()
  return acc


def _series(acc, tag):
  """{step: value} of a tag (a float for a scalar, the (left, right, count) rows of a histogram)."""
  return {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}


def _scalars(acc, tag):
  return {step: float(v) for step, v in _series(acc, tag).items()}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tb_study")
  run_config(_config(), str(workdir))
  return workdir, read_results(workdir / "results.csv")


def test_one_run_per_prior_with_the_results_csv_values(study):
  workdir, rows = study
  assert sorted(d for d in os.listdir(workdir / "tb") if (workdir / "tb" / d).is_dir()) == ["hparams", "scratch",
                                                                                            "warm"]
  for prior in ("scratch", "warm"):
    acc = _accumulator(workdir / "tb" / prior)
    mine = [r for r in rows if r["prior"] == prior]
    sizes = sorted({r["n_train"] for r in mine})
    assert sizes == [0, 3, 6]
    mae = _scalars(acc, "test/mae")
    assert sorted(mae) == sizes
    for n in sizes:
      trials = [r for r in mine if r["n_train"] == n]
      assert mae[n] == pytest.approx(np.mean([r["mae"] for r in trials]), rel=1e-6)
      for key in ("cs5", "plcc", "srocc"):
        logged = _scalars(acc, f"test/{key}")
        assert logged[n] == pytest.approx(np.mean([r[key] for r in trials]), rel=1e-5, abs=1e-6)
      sd = _scalars(acc, "test/mae_sd")[n]
      assert sd == pytest.approx(np.std([r["mae"] for r in trials], ddof=0) if len(trials) > 1 else 0.0, rel=1e-5)
      hist = _series(acc, "test/trial_mae")[n]
      assert hist[:, 2].sum() == len(trials)
      assert hist[0, 0] <= min(r["mae"] for r in trials) + 1e-4 and max(r["mae"] for r in trials) <= hist[-1, 1] + 1e-4
    # the untouched prior has no training set, so no baseline: that step is left out, not logged as NaN
    assert sorted(_scalars(acc, "test/baseline_mae")) == [3, 6]
    for tag in ("test/mae", "test/mae_sd", "test/cs5", "test/plcc", "test/srocc", "test/baseline_mae",
                "test/trial_mae", "test/residuals"):
      assert "Step = n_train" in acc.SummaryMetadata(tag).summary_description, tag
    residuals = {step: rows[:, 2].sum() for step, rows in _series(acc, "test/residuals").items()}
    assert residuals == {3: 2 * 40, 6: 2 * 40}  # every trial's every test face (40 in the tiny config)


def test_every_trial_loss_at_every_step(study):
  workdir, rows = study
  acc = _accumulator(workdir / "tb" / "scratch")
  for n, trials, _, steps in SIZES:
    series = [_scalars(acc, f"train_loss/scratch/n{n}/trial{t:02d}") for t in range(trials)]
    assert [sorted(x) for x in series] == [list(range(1, steps + 1))] * trials
    per_trial = [[x[s] for s in sorted(x)] for x in series]
    mean = _scalars(acc, f"train_loss/scratch/n{n}/mean")
    assert sorted(mean) == list(range(1, steps + 1))
    mean = [mean[s] for s in sorted(mean)]
    np.testing.assert_allclose(mean, np.mean(per_trial, axis=0), rtol=1e-5)
    upper = _scalars(acc, f"train_loss_band/scratch/n{n}/upper")
    np.testing.assert_allclose([upper[s] for s in sorted(upper)], np.mean(per_trial, axis=0) + np.std(
        per_trial, axis=0, ddof=0), rtol=1e-5)
    final = [r["train_loss"] for r in rows if r["prior"] == "scratch" and r["n_train"] == n]
    last = np.array(per_trial)[:, -TRAIN_LOSS_STEPS:]  # results.csv's train_loss: the mean of the last 10 steps
    np.testing.assert_allclose(np.mean(last, axis=1), final, rtol=1e-5)
  warm = _accumulator(workdir / "tb" / "warm")
  assert sorted(_scalars(warm, "pretrain/loss")) == [1, 2, 3, 4]
  assert sorted(_scalars(warm, "pretrain/val_mae")) == [2, 4]
  assert "pre-training stage of prior warm" in warm.SummaryMetadata("pretrain/loss").summary_description


def test_root_run_has_layout_curve_and_table(study):
  workdir, rows = study
  acc = _accumulator(workdir / "tb")
  steps = [e.step for e in acc.Tensors("learning_curve")]
  assert steps == list(range(1, len({(r["prior"], r["n_train"]) for r in rows}) + 1))  # refreshed after each size
  from tensorboard.plugins.custom_scalar import layout_pb2, metadata

  layout = layout_pb2.Layout()
  layout.ParseFromString(acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
  charts = {c.title: c for cat in layout.category for c in cat.chart}
  margin = charts["test MAE mean +- SD (step = n_train)"].margin.series[0]
  assert (margin.value, margin.lower, margin.upper) == ("test/mae", "test/mae_lower", "test/mae_upper")
  assert charts["warm n=6: train loss of every trial and their mean"].multiline.tag == ["^train_loss/warm/n6/"]
  band = charts["warm n=6: mean train loss +- SD over trials"].margin.series[0]
  assert (band.value, band.upper) == ("train_loss/warm/n6/mean", "train_loss_band/warm/n6/upper")


def test_hparams_session_per_prior_and_size(study):
  workdir, rows = study
  from tensorboard.plugins.hparams import metadata as hp_metadata

  sessions = sorted(os.path.relpath(root, workdir / "tb" / "hparams") for root, _, files in
                    os.walk(workdir / "tb" / "hparams") if any(f.startswith("events") for f in files))
  assert sessions == [f"{p}/n{n:05d}" for p in ("scratch", "warm") for n in (0, 3, 6)]
  acc = _accumulator(workdir / "tb" / "hparams" / "warm" / "n00003")
  start = hp_metadata.parse_session_start_info_plugin_data(
      acc.SummaryMetadata(hp_metadata.SESSION_START_INFO_TAG).plugin_data.content)
  hp = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
  assert hp["prior"] == "warm" and hp["n"] == 3 and hp["trials"] == 2 and hp["steps"] == 4
  assert hp["freeze"] == "none" and hp["head"].startswith("regression")
  mae = np.mean([r["mae"] for r in rows if r["prior"] == "warm" and r["n_train"] == 3])
  assert _scalars(acc, "hparams/mae") == {3: pytest.approx(mae, rel=1e-6)}
  assert all(math.isfinite(_scalars(acc, f"hparams/{k}")[3]) for k in ("mae_sd", "cs5", "plcc", "srocc"))
