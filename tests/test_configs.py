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
