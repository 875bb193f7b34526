"""The paper configs: protocol tables and clear errors for missing paths."""

import numpy as np
import pytest

from agejax.errors import ConfigError
from agejax.main import run_config
from configs import lap, morph


def test_lap_config_is_the_papers_protocol():
  c = lap.get_config("dex=/p/dex,imagenet=/p/in")
  assert c.sizes[0] == (3, 32, 3, 15) and c.sizes[-1] == (1981, 1, 2000, 10000)
  assert [s[1] for s in c.sizes] == [32, 32, 32, 32, 16, 8, 4, 2, 1, 1, 1, 1]
  assert (c.optim.base_lr, c.optim.momentum, c.optim.weight_decay, c.batch_size) == (1e-4, 0.9, 5e-4, 10)
  assert (c.data.resize, c.data.crop, len(c.data.rotation_angles)) == (256, 224, 10)
  assert [(p["name"], p["head"]) for p in c.priors] == [("dex", "keep"), ("imagenet", "new")]


def test_morph_config_sizes():
  c = morph.get_config("dex=/p")
  assert [s[0] for s in c.sizes][:3] == [3, 6, 9] and c.sizes[-1][0] == 4380
  assert c.sizes[0][1] == 32 and c.sizes[-1][1] == 1


@pytest.mark.parametrize("module", [lap, morph])
def test_missing_dataset_root_names_the_field(module, tmp_path):
  c = module.get_config("dex=/p")
  with pytest.raises(ConfigError, match=r"config\.data\.root"):
    run_config(c, str(tmp_path))


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="unknown config argument 'nope'"):
    lap.get_config("nope=1")


def test_heads_config_builds_every_head(tmp_path):
  """configs/heads.py: one entry per head on one (here tiny, random) dlib-shaped prior, each resolving to its
  head; kept entries reuse the prior's 81-bin layer, new ones get 101 bins."""
  from fake_weights import random_variables

  from agejax.experiments.priors import resolve_prior
  from agejax.models import Preprocess, build_model, save_pretrained
  from configs import heads

  bins = [0.25] + [float(k) for k in range(1, 81)]
  spec = {"arch": "dlib_resnet10", "head": "dex", "num_classes": 81, "bin_values": bins, "backbone": {"width": 1 / 16}}
  variables = random_variables(build_model(spec), 32)
  save_pretrained(str(tmp_path / "dlib"), spec, variables, Preprocess(resize=32, crop=32))
  c = heads.get_config(f"runlocal,dlib={tmp_path / 'dlib'}")
  assert [p["name"] for p in c.priors] == list(heads.HEAD_NAMES) and c.trials.freeze == "backbone"
  assert [r[0] for r in c.sizes] == [3, 6, 12, 24, 48, 96, 192, 384, 768] and c.sizes[0] == (3, 32, 40, 50)
  assert [r[1] for r in c.sizes][-4:] == [4, 4, 4, 4]  # runlocal: every size has an SD
  kinds = set()
  for entry in c.priors:
    prior = resolve_prior(entry, c.model, 32, c.seed)
    head = prior.head_kind()
    kinds.add(head.kind)
    kernel = prior.variables["params"]["head"].get("fc", {}).get("kernel")
    if entry["head"] == "keep":
      assert (head.num_classes, head.bin_values) == (81, tuple(bins))
      np.testing.assert_array_equal(kernel, variables["params"]["head"]["fc"]["kernel"])
    else:
      assert head.kind == entry["head_type"] and prior.new_head and head.num_classes in (1, 101)
    assert head.decoding == ("median" if entry["name"] in ("keep-dex-median", "new-coral", "new-corn")
                             else "expectation")
  assert kinds == {"dex", "dldl", "dldl_v2", "mean_variance", "sord", "coral", "corn", "regression"}
  assert [p["name"] for p in heads.get_config("dlib=/p,heads=new-sord+keep-dex").priors] == ["new-sord", "keep-dex"]
  with pytest.raises(ConfigError, match="unknown head 'new-softmax'"):
    heads.get_config("dlib=/p,heads=new-softmax")
  with pytest.raises(ConfigError, match="needs dlib=DIR"):
    heads.get_config("runlocal")


# -- every field declared once, in agejax.configs.base_config / transfer_config (issue 14) --------------------
CONFIG_ARGS = {"demo": "", "demo:tiny": "quick,tiny", "utkface": "", "utkface:untouched": "untouched,wrn=/p/w",
               "heads": "dlib=/p/dlib", "lap": "dex=/p/dex,imdb=/p/imdb", "lap_impose": "dex=/p/dex,imdb=/p/imdb",
               "morph": "dex=/p/dex,imdb=/p/imdb", "morph_impose": "dex=/p/dex,imdb=/p/imdb", "utkface_impose": "",
               "imdb_transfer": "", "utkface_transfer": "runlocal"}
# Sections a config replaces as a whole: a solver's fields are its own (agejax.engine.optim's per-solver defaults).
OWN_SECTIONS = ("optim",)


def _declared(section, prefix=""):
  """'a.b' paths of every field a ConfigDict declares (not into a plain-dict value such as data.select)."""
  import ml_collections

  for key, value in section.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict) and prefix + key not in OWN_SECTIONS:
      yield from _declared(value, f"{prefix}{key}.")


def _has(config, path):
  node = config
  for key in path.split("."):
    if key not in node:
      return False
    node = node[key]
  return True


def _config_files(tmp_path):
  import importlib
  import os

  from agejax.configs import REPO_ROOT

  csv = tmp_path / "faces.csv"
  csv.write_text("path,age\n" + "".join(f"f{i}.jpg,{20 + i}\n" for i in range(10)))
  args = CONFIG_ARGS | {"custom": f"csv={csv}"}
  names = {name.removesuffix(".py") for name in os.listdir(os.path.join(REPO_ROOT, "configs"))} - {"__init__"}
  assert names <= {key.split(":")[0] for key in args}, "give every configs/*.py its arguments in CONFIG_ARGS"
  return {key: importlib.import_module(f"configs.{key.split(':')[0]}").get_config(arg) for key, arg in args.items()}


def test_every_config_has_every_declared_field(tmp_path):
  from agejax.configs import base_config, transfer_config

  for name, c in _config_files(tmp_path).items():
    base = transfer_config() if c.study == "transfer" else base_config()
    missing = [path for path in _declared(base) if not _has(c, path)]
    assert not missing, f"configs/{name}: {missing}"
    if c.study == "learning_curve":  # the default a trial run reads, no longer repeated in the code
      assert c.keep_states_mb == 2048 and c.data.pad_mode in ("edge", "reflect")


def test_the_study_data_fields_are_declared_for_both_studies():
  """config.data is merged with a pre-training stage's and a prior's own data: both studies declare its fields."""
  from agejax.configs import base_config, data_section, transfer_config
  from agejax.experiments.study_data import VIEW_FIELDS

  shared = set(data_section())
  assert set(VIEW_FIELDS) <= shared and {"split_lists", "use_dataset_split", "pool_fraction", "skew"} <= shared
  assert shared <= set(base_config().data) and shared <= set(transfer_config().data)
  assert (data_section().pad_fraction, data_section().pad_mode, data_section().crop_fraction) == (0.0, "edge", 1.0)
  assert transfer_config().data.crop == 256 and not transfer_config().data.random_crop  # the study's own


def test_a_locked_config_takes_declared_fields_from_the_command_line(monkeypatch):
  import os
  import sys

  from absl import flags
  from ml_collections import config_flags

  from agejax.configs import REPO_ROOT

  def parse(*overrides):  # as agejax.main parses them (config_flags reads the overrides from sys.argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    argv = ["prog", f"--config={os.path.join(REPO_ROOT, 'configs', 'demo.py')}:quick,tiny", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    fv(argv)
    return fv.config

  c = parse("--config.keep_states_mb=512", "--config.data.pad_fraction=0.25", "--config.data.split_lists=/l",
            "--config.data.use_dataset_split=True")
  assert c.is_locked and c.keep_states_mb == 512 and c.data.pad_fraction == 0.25
  assert c.data.split_lists == "/l" and c.data.use_dataset_split is True
  with pytest.raises(Exception, match="keep_state_mb"):  # still locked: an undeclared field is refused
    parse("--config.keep_state_mb=1")


def test_validate_names_a_field_the_config_does_not_declare():
  from agejax.validate import validate_config
  from configs import demo

  validate_config(demo.get_config("quick,tiny"))
  for section, key in (("data", "resize_mode"), ("trials", "conv_impl"), (None, "keep_states_mb")):
    c = demo.get_config("quick,tiny")
    del (c[section] if section else c)[key]
    with pytest.raises(ConfigError, match=rf"config\.{section + '.' if section else ''}{key} is not set"):
      validate_config(c)


def test_synthetic_data_reads_its_sizes_from_the_section():
  from agejax.configs import data_section
  from agejax.experiments.study_data import load_study_data

  data = load_study_data(data_section(resize=8, pool_size=7, test_size=5, skew=0.5), seed=0)
  assert (len(data.pool_ages), len(data.test_ages), data.pool_images.shape[1:]) == (7, 5, (8, 8, 3))
  with pytest.raises(AttributeError, match="pool_size"):  # a section lacking a field is an error, not a default
    load_study_data(dict(name="synthetic", resize=8, test_size=5, skew=0.0), seed=0)
