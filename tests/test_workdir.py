"""A workdir's fingerprint: a rerun with other defining fields stops naming them; overwrite replaces them."""

import os

import pytest

from agejax.configs import base_config
from agejax.errors import ConfigError
from agejax.reports.workdir import differing_fields, prepare_workdir


def _saved(tmp_path, cfg):
  (tmp_path / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  (tmp_path / "results.csv").write_text("prior,n_train\nx,0\n")
  (tmp_path / "splits").mkdir()
  (tmp_path / "splits" / "test.txt").write_text("a\t1\n")


def test_a_new_or_same_workdir_passes(tmp_path):
  cfg = base_config()
  assert prepare_workdir(str(tmp_path), cfg) is False  # nothing there yet
  _saved(tmp_path, cfg)
  cfg.progress = False  # not a defining field
  cfg.trials.parallel = "vmap"
  assert prepare_workdir(str(tmp_path), cfg) is True
  assert (tmp_path / "results.csv").exists()


def test_other_defining_fields_stop_the_rerun_naming_them(tmp_path):
  cfg = base_config()
  _saved(tmp_path, cfg)
  cfg.optim.base_lr = 3e-4
  cfg.sizes = ((3, 2, 1, 2),)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(ConfigError) as e:
    prepare_workdir(str(tmp_path), cfg)
  message = str(e.value)
  assert "\n" not in message and "optim.base_lr (0.0001 -> 0.0003)" in message
  assert "sizes ([] -> [[3, 2, 1, 2]])" in message
  assert "--config.overwrite=True" in message
  assert (tmp_path / "config.json").read_text() == before  # nothing rewritten under the old results


def test_overwrite_removes_the_old_results(tmp_path):
  cfg = base_config()
  _saved(tmp_path, cfg)
  cfg.seed = 1
  cfg.overwrite = True
  assert prepare_workdir(str(tmp_path), cfg) is False
  assert not (tmp_path / "results.csv").exists() and not (tmp_path / "splits").exists()
  assert os.path.exists(tmp_path / "config.json")  # the run writes its own next


def test_differing_fields_ignore_how_a_run_is_carried_out():
  a, b = base_config(), base_config()
  b.mesh.cpu_devices, b.checkpoint.every_chunks, b.data.cache_dir, b.title = 2, 3, "/tmp/c", "t"
  assert differing_fields(a.to_dict(), b) == []
  b.data.pad_fraction = 0.4
  assert differing_fields(a.to_dict(), b) == ["data.pad_fraction (0.0 -> 0.4)"]  # declared in base_config


def test_a_config_json_from_before_a_field_was_declared_still_resumes(tmp_path):
  """Fields declared in base_config later (data.pad_fraction, ...) read as their defaults in an older config.json."""
  import json

  from configs import demo

  cfg = demo.get_config("quick,tiny")  # its optim section is its own (no momentum): nothing to fill there
  old = cfg.to_dict()
  for key in ("pad_fraction", "pad_mode", "split_lists", "use_dataset_split"):
    del old["data"][key]
  _saved(tmp_path, cfg)
  (tmp_path / "config.json").write_text(json.dumps(old, default=str))
  assert prepare_workdir(str(tmp_path), cfg) is True
  cfg.data.pad_fraction = 0.25
  with pytest.raises(ConfigError, match=r"data\.pad_fraction \(0\.0 -> 0\.25\)"):
    prepare_workdir(str(tmp_path), cfg)
