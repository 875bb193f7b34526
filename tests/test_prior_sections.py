"""A prior entry's own `optim` and `data` sections: merged for that prior only, the draws shared, bad fields named."""

import numpy as np
import pytest

from agejax.configs import base_config, data_section, tiny_vgg
from agejax.errors import ConfigError
from agejax.experiments.learning_curve import prior_config
from agejax.experiments.study_data import StudyData, data_view
from agejax.main import run_config


def _study():
  c = base_config()
  c.data.update(name="synthetic", resize=36, crop=32, pool_size=30, test_size=12)
  c.model.preprocess = dict(channel_order="RGB", scale=1.0)
  model = tiny_vgg(width=1 / 16, fc_dim=16) | {"head": "regression"}
  c.model.head = "regression"
  c.optim.update(name="adam", base_lr=1e-2, rules=((".*", 1.0, 1.0),))
  c.priors = [dict(name="learns", model=model, head="new"),
              dict(name="frozen-lr", model=model, head="new", optim=dict(base_lr=0.0))]
  c.sizes = ((3, 2, 5, 6),)
  c.trials.update(parallel="loop", conv_impl="lax", chunk_steps=6)
  c.progress = False
  c.save_trials = "none"
  c.diagnostics = False
  c.checkpoint.enabled = False
  return c


def test_a_prior_solver_applies_to_that_prior_only(tmp_path):
  rows = run_config(_study(), str(tmp_path))
  mae = {(r["prior"], r["n_train"], r["trial"]): r["mae"] for r in rows}
  # both priors start from the same weights (same spec and seed: trial 0's new head is size 0's); lr 0 leaves
  # trial 0 at size 0's MAE, the study's lr moves it
  assert mae[("learns", 0, 0)] == mae[("frozen-lr", 0, 0)]
  assert mae[("frozen-lr", 3, 0)] == pytest.approx(mae[("frozen-lr", 0, 0)], abs=1e-5)
  assert abs(mae[("learns", 3, 0)] - mae[("learns", 0, 0)]) > 1e-3
  assert abs(mae[("learns", 3, 1)] - mae[("frozen-lr", 3, 1)]) > 1e-3
  splits = [(tmp_path / "splits" / p / "n00003" / "trial01.txt").read_text().splitlines()[1:]
            for p in ("learns", "frozen-lr")]
  assert splits[0] == splits[1]  # the same draws for every prior


def test_prior_sections_name_bad_fields():
  c = _study()
  assert prior_config(c, {"name": "plain"}) is c
  own = prior_config(c, {"name": "p", "optim": {"base_lr": 3e-4}, "data": {"pad_fraction": 0.25}})
  assert own.optim.base_lr == 3e-4 and own.optim.name == "adam" and own.data.pad_fraction == 0.25
  assert c.optim.base_lr == 1e-2 and c.data.pad_fraction == 0.0  # the study's config is untouched
  with pytest.raises(ConfigError, match=r"priors\[p\]\.optim: unknown field\(s\) lr\b"):
    prior_config(c, {"name": "p", "optim": {"lr": 1.0}})
  with pytest.raises(ConfigError, match=r"priors\[p\]\.data: test_size cannot differ between priors"):
    prior_config(c, {"name": "p", "data": {"test_size": 5}})


def test_a_data_view_decodes_the_same_split_again(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  paths = []
  for i in range(4):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(paths[-1])
  cfg = data_section(resize=8, cache_dir="none", pad_fraction=0.0, pad_mode="edge").to_dict()
  blank = np.zeros((2, 8, 8, 3), np.uint8)
  data = StudyData(blank, np.ones(2, np.float32), np.arange(2), paths[:2], blank, np.ones(2, np.float32), None,
                   paths[2:], None, {"source": "utkface"})
  assert data_view(data, cfg, dict(cfg)) is data
  padded = data_view(data, cfg, {**cfg, "pad_fraction": 0.5, "pad_mode": "reflect"})
  assert padded.pool_names == data.pool_names and padded.test_names == data.test_names
  assert padded.pool_images.shape == (2, 8, 8, 3) and padded.pool_images.any() and padded.test_images.any()


@pytest.mark.parametrize("extra, match", [
    ({"optim": {"lr": 1.0}}, r"priors\[p\]\.optim\.lr is not a solver field"),
    ({"optim": {"name": "rmsprop"}}, r"priors\[p\]\.optim: unknown optim\.name 'rmsprop'"),
    ({"data": {"root": "/elsewhere"}}, r"priors\[p\]\.data: root cannot differ between priors"),
    ({"freeze": 3}, r"priors\[p\]\.freeze=3"),
    ({"head_type": "softmax"}, r"priors\[p\]\.head_type='softmax'"),
])
def test_prior_sections_are_checked_before_the_run(extra, match):
  from agejax.validate import validate_config

  c = _study()
  c.priors = [dict(c.priors[0]) | {"name": "p"} | extra]
  with pytest.raises(ConfigError, match=match):
    validate_config(c)


def test_train_loss_is_the_last_ten_steps_whatever_the_chunk():
  from agejax.experiments.size_loop import final_train_loss

  losses = np.arange(40, dtype=np.float32)  # a trial of 33 steps in chunks of 20 (padded to 40) or 11 (to 33)
  assert final_train_loss(losses, 33) == final_train_loss(losses[:33], 33) == float(np.arange(23, 33).mean())
  assert final_train_loss(losses, 4) == float(np.arange(4).mean())  # fewer steps than 10: all of them
