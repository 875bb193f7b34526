"""The single-model trainer: the Grain path equals the device path; a run stopped by SIGTERM (or crashed) after a
checkpoint resumes to the same parameters, on both paths; an interrupted pre-training stage resumes mid-stage."""

import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from fake_weights import random_variables

from agejax.engine import fit as fit_lib
from agejax.engine.checkpoint import CheckpointConfig, FitCheckpointing, Preempted, StopOnSignal
from agejax.engine.step import init_state
from agejax.models import build_model
from agejax.models.pretrained import Preprocess, load_pretrained, save_pretrained

PRE = Preprocess("RGB", 1.0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 36, 32)
SPEC = dict(arch="vgg16", head="regression", regression_hidden=(8, 4), backbone=dict(width=1 / 16, fc_dim=16))
# 30 items at batch 4: 8 steps an epoch; validation every 3 steps, early stopping off; checkpoints every 2 steps
CFG = fit_lib.FitConfig(batch_size=4, crop=32, steps=10, random_crop=True, eval_every=3)
CKPT = CheckpointConfig(every_steps=2, keep=2, async_save=True)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
  from agejax.main import enable_compilation_cache

  enable_compilation_cache()


@pytest.fixture(scope="module")
def setup():
  model = build_model(SPEC)
  variables = random_variables(model, 32)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (40, 36, 36, 3), dtype=np.uint8)
  ages = np.linspace(5, 70, 40, dtype=np.float32)
  optimizer = fit_lib.optimizer_for(ml_collections.ConfigDict(dict(name="adam", base_lr=1e-3)),
                                    variables["params"], "full")
  return model, variables, optimizer, images, ages


def _fit(setup, loader, checkpoint=None, on_eval=None, on_losses=None):
  model, variables, optimizer, images, ages = setup
  state = init_state(jax.tree.map(jnp.asarray, variables), optimizer, 0)
  return fit_lib.fit(model, "regression", PRE, optimizer, state, CFG, "full", images, ages, np.arange(30),
                     images[30:], ages[30:], seed=3, progress=False, loader=loader, checkpoint=checkpoint,
                     on_eval=on_eval, on_losses=on_losses)


def _same(a, b):
  assert jax.tree.all(jax.tree.map(np.array_equal, (a.params, a.batch_stats), (b.params, b.batch_stats)))
  assert a.history == b.history and (a.best_step, a.best_val_mae, a.steps_run) == (b.best_step, b.best_val_mae,
                                                                                     b.steps_run)


@pytest.fixture(scope="module")
def reference(setup):
  return _fit(setup, "device")


def test_grain_path_gives_the_device_paths_numbers(setup, reference):
  grain = _fit(setup, "grain")
  assert (grain.loader, reference.loader) == ("grain", "device")
  assert [r["step"] for r in reference.history] == [3, 6, 9, 10] and 0 < reference.best_step <= 10
  _same(grain, reference)


def test_auto_keeps_a_small_set_on_the_device(setup):
  model, variables, optimizer, images, _ = setup
  state = init_state(variables, optimizer, 0)
  assert fit_lib.choose_loader("auto", model, state, CFG, images) == "device"
  with pytest.raises(ValueError, match="loader"):
    fit_lib.choose_loader("disk", model, state, CFG, images)


@pytest.mark.parametrize("loader", ["device", "grain"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(setup, reference, loader, tmp_path, caplog):
  """SIGTERM during step 5's validation interval: fit saves at the next step and raises Preempted; the same call
  again resumes there (the loader mid-epoch) and ends with the uninterrupted run's parameters and history."""
  ckpt = FitCheckpointing(str(tmp_path / "ckpt"), CKPT, {"run": "test"})
  seen = []

  def on_losses(step0, losses):
    seen.append((step0, losses.tolist()))
    if step0 == 3:  # the second interval (steps 4..6) ended: stop now
      os.kill(os.getpid(), signal.SIGTERM)

  with StopOnSignal(), pytest.raises(Preempted, match="step 6 of 10"):
    _fit(setup, loader, ckpt, on_losses=on_losses)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "6"]  # every 2 steps, keep 2; the stop at step 6
  with caplog.at_level("INFO"):
    resumed = _fit(setup, loader, ckpt, on_losses=on_losses)
  assert "resuming from checkpoint at step 6" in caplog.text
  _same(resumed, reference)
  assert [s for s, _ in seen] == [0, 3, 6, 9]  # no interval is handed over twice


def test_crash_between_checkpoints_resumes_from_the_last(setup, reference, tmp_path, caplog):
  """A crash (here an exception) at step 9: the rerun resumes from step 8, with the losses of steps 7-8 kept for
  the next interval's mean and the best state of the validations before."""
  ckpt = FitCheckpointing(str(tmp_path / "ckpt"), CKPT, {"run": "test"})

  def crash(record, improved, state):
    if record["step"] == 9:
      raise RuntimeError("crash")

  with pytest.raises(RuntimeError, match="crash"):
    _fit(setup, "grain", ckpt, on_eval=crash)
  with caplog.at_level("INFO"):
    resumed = _fit(setup, "grain", ckpt)
  assert "resuming from checkpoint at step 8" in caplog.text
  _same(resumed, reference)


def test_another_run_does_not_resume_a_foreign_checkpoint(setup, reference, tmp_path, caplog):
  ckpt = FitCheckpointing(str(tmp_path / "ckpt"), CKPT, {"run": "test"})
  with StopOnSignal() as stop:
    stop.flag = True
    with pytest.raises(Preempted, match="step 1 of 10"):
      _fit(setup, "device", ckpt)
  with caplog.at_level("WARNING"):
    again = _fit(setup, "grain", ckpt)  # the loader is part of the fingerprint: start over
  assert "another configuration" in caplog.text
  _same(again, reference)


def _stage_config(tmp_path):
  from agejax.configs import base_config

  prior = str(tmp_path / "dex")
  spec = dict(arch="vgg16", head="dex", num_classes=10, backbone=dict(width=1 / 16, fc_dim=32))
  save_pretrained(prior, spec, random_variables(build_model(spec), 32), PRE)
  c = base_config()
  c.data.update(name="synthetic", resize=36, crop=32)
  c.progress = False
  c.checkpoint.update(every_steps=4, keep=1, async_save=False)
  entry = dict(name="tiny", dir=prior, pretrain=dict(data=dict(name="synthetic", pool_size=60, test_size=10),
                                                    steps=6, batch_size=5, stop="converge", val_size=10,
                                                    eval_every=2, patience=5, optim=dict(name="adam", base_lr=1e-3)))
  c.priors = [entry]
  return c, entry


def test_interrupted_pretraining_stage_resumes_to_the_same_prior(tmp_path, caplog):
  from agejax.experiments import pretrain

  c, entry = _stage_config(tmp_path)
  whole = pretrain.pretrain_prior(entry, c, str(tmp_path / "whole"))
  work = tmp_path / "stopped"
  with StopOnSignal() as stop:
    stop.flag = True  # SIGTERM before the stage began: it stops at its first step, after a checkpoint
    with pytest.raises(Preempted, match="pretrain tiny: stopped on request at step 1 of 6"):
      pretrain.pretrain_prior(entry, c, str(work))
  assert (work / "ckpt" / "tiny").is_dir() and not os.path.exists(pretrain.stage_dir(entry, c, str(work)))
  with caplog.at_level("INFO"):
    resumed = pretrain.pretrain_prior(entry, c, str(work))
  assert "resuming from checkpoint at step 1" in caplog.text
  assert not (work / "ckpt").exists()  # removed once the prior is saved
  a, b = load_pretrained(whole)[1], load_pretrained(resumed)[1]
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
