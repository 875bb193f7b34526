"""The data of a learning-curve study: a training pool and a fixed, disjoint test set, decoded once.

`config.data.name` selects the source:
  synthetic  procedurally generated images (the demo; no files);
  utkface    the real UTKFace folder: exact duplicates grouped first, so no copy of a test image is in
             the pool; a seeded test set of `test_size` images; the rest (one copy per group) is the pool;
  lap        ChaLearn LAP: pool = `pool_fraction` of the train split (80% in the paper), test = valid split,
             each pool image stored with `rotations` extra rotated versions (10 in the paper);
  morph / generic / appa_real / fgnet / agedb / imdb_wiki   a reader's records, split by `test_fraction`
             (subject-disjoint when the records carry subjects).
Pool items sharing a `group` (a base image and its rotated versions) are drawn together.
`config.data.select` keeps only records whose fields match, e.g. {'race': (2,)} (UTKFace race codes) or
{'gender': ('F',)}: a field of the record or of its `extra` dict, against a list of allowed values.
"""

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from agejax.data.records import AgeRecord, Rejections
from agejax.data.synthetic import synthetic_dataset
from agejax.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StudyData:
  """Pool and test set as uint8 arrays (N, S, S, 3), RGB, resized to `data.resize`."""

  pool_images: np.ndarray
  pool_ages: np.ndarray
  pool_groups: np.ndarray  # base-image id of every pool item
  pool_names: list[str]  # one name per base image (group), for the split lists
  test_images: np.ndarray
  test_ages: np.ndarray
  test_sigma: np.ndarray | None
  test_names: list[str]
  rejections: Rejections
  info: dict[str, Any]

  @property
  def num_bases(self) -> int:
    return len(self.pool_names)

  def group_members(self) -> list[np.ndarray]:
    """Pool indices of every base image, in base order."""
    order = np.argsort(self.pool_groups, kind="stable")
    bounds = np.searchsorted(self.pool_groups[order], np.arange(self.num_bases + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(self.num_bases)]


def _require_root(cfg: Mapping[str, Any], field: str = "root") -> str:
  root = cfg.get(field)
  if not root:
    raise ConfigError(f"config.data.{field} is not set: point it at the {cfg.get('name')} dataset folder "
                      f"(e.g. --config.data.{field}=/path/to/dataset)")
  if not os.path.exists(root):
    raise ConfigError(f"config.data.{field}={root!r} does not exist: set it to the {cfg.get('name')} dataset folder")
  return root


def load_study_data(cfg: Mapping[str, Any], seed: int) -> StudyData:
  """Loads the pool and test set a config's `data` section describes."""
  name = cfg.get("name")
  if name == "synthetic":
    return _synthetic(cfg, seed)
  if name in ("utkface", "morph", "generic", "appa_real", "fgnet", "agedb", "imdb_wiki", "lap"):
    return _from_records(cfg, seed)
  raise ConfigError(f"unknown config.data.name {name!r}")


def _synthetic(cfg: Mapping[str, Any], seed: int) -> StudyData:
  size = cfg["resize"]
  pool_x, pool_y = synthetic_dataset(cfg.get("pool_size", 400), size, seed=seed * 7 + 1, skew=cfg.get("skew", 0.0))
  test_x, test_y = synthetic_dataset(cfg.get("test_size", 200), size, seed=seed * 7 + 2, skew=cfg.get("skew", 0.0))
  n = len(pool_y)
  return StudyData(pool_x, pool_y, np.arange(n), [f"synthetic/pool/{i:05d}" for i in range(n)], test_x, test_y,
                   None, [f"synthetic/test/{i:05d}" for i in range(len(test_y))], Rejections("skip"),
                   {"source": "synthetic (procedurally generated, not faces)"})


def _records(cfg: Mapping[str, Any]) -> tuple[list[AgeRecord], Rejections]:
  from agejax.data.readers import load_dataset

  root = _require_root(cfg)
  options = dict(cfg.get("reader_options", {}) or {})
  ds = load_dataset(cfg["name"], root, policy=cfg.get("policy", "skip"), **options)
  if not ds.records:
    raise ConfigError(f"config.data.root={root!r}: the {cfg['name']} reader found no usable images")
  return ds.records, ds.rejections


def _split(cfg: Mapping[str, Any], records: list[AgeRecord], seed: int) -> tuple[list[int], list[int], dict]:
  """Pool and test indices; duplicates never straddle the split."""
  from agejax.data.duplicates import exact_duplicate_groups, split_without_leaks

  if cfg["name"] == "lap" or cfg.get("use_dataset_split"):
    train = [i for i, r in enumerate(records) if r.split == "train"]
    test = [i for i, r in enumerate(records) if r.split in ("valid", "validation", "val")]
    if not train or not test:
      raise ConfigError("the dataset has no train/valid splits; unset config.data.use_dataset_split")
    rng = np.random.default_rng([seed, 11])
    keep = int(round(len(train) * cfg.get("pool_fraction", 0.8)))
    pool = sorted(rng.choice(train, size=keep, replace=False).tolist())
    return pool, test, {"split": "dataset's own train/valid", "pool_fraction": cfg.get("pool_fraction", 0.8)}
  groups = exact_duplicate_groups([r.path for r in records]) if cfg.get("dedupe", True) else []
  test_size = cfg.get("test_size") or int(round(len(records) * cfg.get("test_fraction", 0.2)))
  pool, test = split_without_leaks(records, test_size, seed, groups)
  return list(pool), list(test), {"duplicate_groups": len(groups),
                                  "duplicate_copies": sum(len(g) - 1 for g in groups)}


def select_records(records: list[AgeRecord], select: Mapping[str, Any] | None) -> list[AgeRecord]:
  """Records whose fields (attributes or `extra` entries) take one of the allowed values per field."""
  if not select:
    return records

  def value(r: AgeRecord, field: str) -> Any:
    return getattr(r, field) if hasattr(r, field) else r.extra.get(field)

  allowed = {f: set(v) if isinstance(v, (list, tuple, set)) else {v} for f, v in dict(select).items()}
  return [r for r in records if all(value(r, f) in ok for f, ok in allowed.items())]


def _from_records(cfg: Mapping[str, Any], seed: int) -> StudyData:
  from agejax.data.cache import load_images
  from agejax.data.images import rotated_versions

  records, rejections = _records(cfg)
  if cfg.get("select"):
    n_read = len(records)
    records = select_records(records, cfg["select"])
    if not records:
      raise ConfigError(f"config.data.select={dict(cfg['select'])!r} keeps none of the {n_read} records")
    log.info("data: select %s keeps %d of %d records", dict(cfg["select"]), len(records), n_read)
  if cfg.get("max_records"):
    rng = np.random.default_rng([seed, 12])
    keep = np.sort(rng.choice(len(records), size=min(cfg["max_records"], len(records)), replace=False))
    records = [records[i] for i in keep]
  pool_idx, test_idx, info = _split(cfg, records, seed)
  if cfg.get("pool_limit"):
    pool_idx = pool_idx[: cfg["pool_limit"]]
  from agejax.data.cache import default_cache_dir

  # Decoded images are cached on disk (keyed by the file list and size); cache_dir 'none' turns it off.
  cache_dir = cfg.get("cache_dir") or default_cache_dir()
  size, cache_dir = cfg["resize"], (None if cache_dir == "none" else cache_dir)

  def decode(idx: list[int]) -> tuple[np.ndarray, list[AgeRecord]]:
    images, kept = load_images([records[i].path for i in idx], size, cache_dir, resize=cfg.get("resize_mode", "squash"),
                               rejections=rejections)
    return images, [records[idx[k]] for k in kept]

  pool_images, pool_recs = decode(pool_idx)
  test_images, test_recs = decode(test_idx)
  angles = tuple(cfg.get("rotation_angles", ()) or ())
  pool_groups = np.arange(len(pool_recs))
  if angles:  # the paper stores every LAP training image with rotated versions, drawn together
    versions = [np.stack([im, *rotated_versions(im, angles)]) for im in pool_images]
    pool_images = np.concatenate(versions)
    pool_groups = np.repeat(pool_groups, len(angles) + 1)
  pool_ages = np.repeat(np.array([r.age for r in pool_recs], np.float32), len(angles) + 1)
  sig = [r.age_std for r in test_recs]
  test_sigma = np.array(sig, np.float32) if all(s is not None for s in sig) else None
  info.update(source=cfg["name"], root=cfg.get("root"), pool_bases=len(pool_recs), test=len(test_recs),
              rotations=len(angles), rejected=rejections.to_dict(),
              select={k: list(v) if isinstance(v, (list, tuple)) else v
                      for k, v in dict(cfg.get("select") or {}).items()})
  log.info("data: %d pool images (%d bases), %d test images", len(pool_images), len(pool_recs), len(test_recs))
  return StudyData(pool_images, pool_ages, pool_groups, [r.path for r in pool_recs], test_images,
                   np.array([r.age for r in test_recs], np.float32), test_sigma, [r.path for r in test_recs],
                   rejections, info)
