"""The paper configs: protocol tables and clear errors for missing paths."""

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
