"""Helpers shared by the config files in configs/ (big_vision style `get_config(arg)`)."""

import os
from typing import Any

import ml_collections

from agejax.engine.optim import CAFFE_VGG_RULES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

# PROTOCOL.md §3: (portion of the 1981-image LAP pool, images, trials, stepsize, max_iter).
LAP_SOLVER = (
    (0.00125, 3, 32, 3, 15), (0.0025, 6, 32, 7, 35), (0.00375, 9, 32, 10, 50), (0.005, 12, 32, 13, 65),
    (0.01, 24, 16, 25, 125), (0.02, 49, 8, 50, 250), (0.04, 99, 4, 100, 500), (0.08, 198, 2, 200, 1000),
    (0.16, 396, 1, 400, 2000), (0.2, 495, 1, 500, 2500), (0.4, 990, 1, 1000, 5000), (0.8, 1981, 1, 2000, 10000),
)
# MORPH 2 sizes of Table 2; trials halve as on LAP, steps scale with the size like the LAP solver.
MORPH_SIZES = (3, 6, 9, 13, 20, 27, 54, 109, 219, 438, 876, 1095, 2190, 4380)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'runlocal,res=64,dex=/p' -> ConfigDict; bare words are True; values typed like their defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    if not eq:
      out[key] = True
      continue
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def trials_for(n: int, smallest_trials: int = 32, first_full: int = 12) -> int:
  """The paper's halving scheme: 32 trials up to ~12 images, then halving per doubling, at least 1."""
  if n <= first_full:
    return smallest_trials
  trials = smallest_trials
  size = first_full
  while size < n and trials > 1:
    size *= 2
    trials //= 2
  return max(trials, 1)


def scaled_sizes(sizes: list[int], steps_per_image: int = 5, smallest_trials: int = 32) -> list[tuple]:
  """(n, trials, stepsize, max_iter) rows with the LAP solver's scaling: stepsize ~ n, max_iter ~ 5 n."""
  return [(n, trials_for(n, smallest_trials), max(n, 1), steps_per_image * n) for n in sizes]


def base_config() -> ml_collections.ConfigDict:
  """Fields every learning-curve config has (PROTOCOL.md §3 defaults)."""
  c = ml_collections.ConfigDict()
  c.study = "learning_curve"
  c.title = "Few-shot learning curve"
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic", root="", resize=256, crop=224, mirror=True, random_crop=True, policy="skip",
      cache_dir="", test_size=0, test_fraction=0.2, dedupe=True, rotation_angles=(), pool_limit=0,
      max_records=0, reader_options={}))
  c.model = ml_collections.ConfigDict(dict(
      head="dex", preprocess=dict(channel_order="BGR", scale=255.0, mean=(104.0, 117.0, 123.0),
                                  std=(1.0, 1.0, 1.0), resize=256, crop=224)))
  c.priors = []
  c.sizes = []
  c.steps_scale = 1.0
  c.min_steps = 1
  c.batch_size = 10
  c.optim = ml_collections.ConfigDict(dict(
      name="caffe_sgd", base_lr=1e-4, momentum=0.9, weight_decay=5e-4, gamma=0.1, rules=CAFFE_VGG_RULES))
  c.trials = ml_collections.ConfigDict(dict(parallel="auto", trial_chunk=0, chunk_steps=50,
                                            auto_candidates=("vmap", "map", "loop")))
  c.eval_batch_size = 64
  c.eval_size_zero = True
  c.save_trials = "best_median"
  c.progress = True
  c.log_trial_losses = True
  return c


def tiny_vgg(width: float = 1 / 16, fc_dim: int = 64, conv_impl: str = "lax") -> dict[str, Any]:
  """A VGG-16 with every layer narrowed, for CPU runs and tests."""
  return dict(arch="vgg16", head="dex", backbone=dict(width=width, fc_dim=fc_dim, conv_impl=conv_impl))
