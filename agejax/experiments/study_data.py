"""The data of a learning-curve study: a training pool and a fixed, disjoint test set, decoded once.

`config.data.name` selects the source:
  synthetic  procedurally generated images (the demo; no files);
  utkface    the real UTKFace folder: exact duplicates grouped first, so no copy of a test image is in
             the pool; a seeded test set of `test_size` images; the rest (one copy per group) is the pool;
  lap        ChaLearn LAP: pool = `pool_fraction` of the train split (80% in the paper), test = valid split,
             each pool image stored with `rotations` extra rotated versions (10 in the paper);
  morph / generic / appa_real / fgnet / agedb / imdb_wiki   a reader's records, split by `test_fraction`
             (subject-disjoint when the records carry subjects: one person's images on one side);
             with `split_column` set, records that carry their own `split` (a CSV's train/test column)
             are split by it instead.
Pool items sharing a `group` (a base image and its rotated versions) are drawn together.
`config.data.select` keeps only records whose fields match, e.g. {'race': (2,)} (UTKFace race codes) or
{'gender': ('F',)}: a field of the record or of its `extra` dict, against a list of allowed values.
A data section holds every field of agejax.configs.data_section (its defaults); a plain dict is accepted too.
"""

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from agejax.data.records import AgeRecord, Rejections
from agejax.data.synthetic import synthetic_dataset
from agejax.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

RECORD_SOURCES = ("utkface", "morph", "generic", "appa_real", "fgnet", "agedb", "imdb_wiki", "lap")
SOURCES = ("synthetic", *RECORD_SOURCES)  # the values of config.data.name


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


def _section(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A data section as a ConfigDict (a pre-training stage passes its own data merged over config.data as a dict)."""
  return cfg if isinstance(cfg, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(cfg))


def _require_root(cfg: ml_collections.ConfigDict) -> str:
  root = cfg.root
  if not root:
    raise ConfigError(f"config.data.root is not set: point it at the {cfg.name} dataset folder "
                      "(e.g. --config.data.root=/path/to/dataset)")
  if not os.path.exists(root):
    raise ConfigError(f"config.data.root={root!r} does not exist: set it to the {cfg.name} dataset folder")
  return root


def load_study_data(cfg: Mapping[str, Any], seed: int) -> StudyData:
  """Loads the pool and test set a config's `data` section describes."""
  cfg = _section(cfg)
  name = cfg.name
  if name == "synthetic":
    return _synthetic(cfg, seed)
  if name in RECORD_SOURCES:
    return _from_records(cfg, seed)
  raise ConfigError(f"unknown config.data.name {name!r}; expected one of {', '.join(SOURCES)}")


def _synthetic(cfg: ml_collections.ConfigDict, seed: int) -> StudyData:
  size = cfg.resize
  pool_x, pool_y = synthetic_dataset(cfg.pool_size, size, seed=seed * 7 + 1, skew=cfg.skew)
  test_x, test_y = synthetic_dataset(cfg.test_size, size, seed=seed * 7 + 2, skew=cfg.skew)
  n = len(pool_y)
  return StudyData(pool_x, pool_y, np.arange(n), [f"synthetic/pool/{i:05d}" for i in range(n)], test_x, test_y,
                   None, [f"synthetic/test/{i:05d}" for i in range(len(test_y))], Rejections("skip"),
                   {"source": "synthetic (procedurally generated, not faces)"})


def _records(cfg: ml_collections.ConfigDict) -> tuple[list[AgeRecord], Rejections]:
  from agejax.data.readers import load_dataset

  root = _require_root(cfg)
  options = dict(cfg.reader_options or {})
  ds = load_dataset(cfg.name, root, policy=cfg.policy, **options)
  if not ds.records:
    raise ConfigError(f"config.data.root={root!r}: the {cfg.name} reader found no usable images")
  return ds.records, ds.rejections


def _split(cfg: ml_collections.ConfigDict, records: list[AgeRecord], seed: int) -> tuple[list[int], list[int], dict]:
  """Pool and test indices; duplicates never straddle the split."""
  from agejax.data.duplicates import distinct_images, exact_duplicate_groups, split_without_leaks

  if cfg.split_lists:  # the authors' fixed pool and test lists instead of a seeded split
    from agejax.data.split_lists import split_from_lists

    return split_from_lists(records, cfg.split_lists, cfg.name)
  if cfg.split_column and any(r.split for r in records):
    return _column_split(records, cfg.dedupe)
  if cfg.name == "lap" or cfg.use_dataset_split:
    train = [i for i, r in enumerate(records) if r.split == "train"]
    test = [i for i, r in enumerate(records) if r.split in ("valid", "validation", "val")]
    if not train or not test:
      raise ConfigError("the dataset has no train/valid splits; unset config.data.use_dataset_split")
    rng = np.random.default_rng([seed, 11])
    keep = int(round(len(train) * cfg.pool_fraction))
    pool = sorted(rng.choice(train, size=keep, replace=False).tolist())
    return pool, test, {"split": "dataset's own train/valid", "pool_fraction": cfg.pool_fraction}
  groups = exact_duplicate_groups([r.path for r in records]) if cfg.dedupe else []
  requested = cfg.test_size or int(round(len(records) * cfg.test_fraction))
  info = {"duplicate_groups": len(groups), "duplicate_copies": sum(len(g) - 1 for g in groups),
          "test_size_requested": requested}
  distinct = distinct_images(records, groups)
  if distinct < 2:
    raise ConfigError(f"config.data: only {distinct} distinct usable image(s) remain, too few for a pool and a "
                      "test set (see data_report.json for what was rejected)")
  test_size = min(requested, distinct - 1)  # at least one pool image
  if test_size < requested:
    info["test_size_shortfall"] = (f"requested {requested} test images, but only {distinct} distinct usable images "
                                   f"remain: the test set has {test_size}, the pool 1 image")
    log.warning("data: %s", info["test_size_shortfall"])
  if any(r.subject for r in records):
    pool, test = _subject_split(records, test_size, seed, groups, info)
  else:
    pool, test = split_without_leaks(records, test_size, seed, groups)
  return list(pool), list(test), info


def _subject_split(records: list[AgeRecord], test_size: int, seed: int, groups: list[list[str]],
                   info: dict) -> tuple[list[int], list[int]]:
  """Like split_without_leaks (one copy per duplicate group), with all of a subject's images on one side:
  subjects are drawn in a seeded order into the test set while they fit in `test_size`."""
  from agejax.data.duplicates import group_ids

  ids = group_ids([r.path for r in records], groups)
  _, keep = np.unique(ids, return_index=True)
  subjects = [records[i].subject or f"\0{i}" for i in keep]  # no subject: the image is its own
  names, owner = np.unique(subjects, return_inverse=True)
  counts = np.bincount(owner)
  chosen, total = np.zeros(len(names), bool), 0
  for s in np.random.default_rng(seed).permutation(len(names)):
    if total + counts[s] <= test_size:
      chosen[s], total = True, total + counts[s]
    if total == test_size:
      break
  test = sorted(keep[chosen[owner]].tolist())
  pool = sorted(keep[~chosen[owner]].tolist())
  if not test or not pool:
    raise DatasetError(f"config.data: the {len(keep)} images belong to {len(names)} subject(s), too few for a "
                       f"subject-disjoint test set of {test_size}")
  info.update(subjects=len(names), subject_disjoint=True)
  if total < test_size:
    info["test_size_shortfall"] = (f"requested {test_size} test images; whole subjects fill {total} "
                                   "(one person's images stay on one side)")
    log.warning("data: %s", info["test_size_shortfall"])
  return pool, test


def _column_split(records: list[AgeRecord], dedupe: bool) -> tuple[list[int], list[int], dict]:
  """The records' own split (a CSV's `split` column): 'train' rows are the pool, 'test' rows the test set; a pool
  copy of a test image is dropped, and subjects on both sides are counted and logged."""
  from agejax.data.duplicates import check_split, exact_duplicate_groups

  odd = [r for r in records if r.split not in ("train", "test")]
  if odd:
    shown = ", ".join(f"{r.source} ({r.split or 'empty'!r})" for r in odd[:3])
    raise DatasetError(f"split column: {len(odd)} row(s) are neither 'train' nor 'test': {shown}"
                       f"{', ...' if len(odd) > 3 else ''}")
  pool = [i for i, r in enumerate(records) if r.split == "train"]
  test = [i for i, r in enumerate(records) if r.split == "test"]
  for side, rows in (("train", pool), ("test", test)):
    if not rows:
      where = records[0].source.rsplit(":", 1)[0] or "the dataset"
      raise DatasetError(f"{where}: split column: no usable '{side}' row; give both train and test rows, or drop "
                         "the column to draw the test set")
  groups = exact_duplicate_groups([r.path for r in records]) if dedupe else []
  kept = set(check_split([records[i].path for i in pool], [records[i].path for i in test], groups, "remove"))
  info = {"split": "the CSV's split column", "duplicate_groups": len(groups),
          "pool_copies_of_test_removed": sum(records[i].path not in kept for i in pool)}
  pool = [i for i in pool if records[i].path in kept]
  if not pool:
    raise DatasetError("split column: every 'train' image is a copy of a 'test' image")
  shared = {records[i].subject for i in pool} & {records[i].subject for i in test} - {None}
  info["subjects_on_both_sides"] = len(shared)
  for key in ("pool_copies_of_test_removed", "subjects_on_both_sides"):
    if info[key]:
      log.warning("data: split column: %s = %d", key, info[key])
  return pool, test, info


def select_records(records: list[AgeRecord], select: Mapping[str, Any] | None) -> list[AgeRecord]:
  """Records whose fields (attributes or `extra` entries) take one of the allowed values per field."""
  if not select:
    return records

  def value(r: AgeRecord, field: str) -> Any:
    return getattr(r, field) if hasattr(r, field) else r.extra.get(field)

  allowed = {f: set(v) if isinstance(v, (list, tuple, set)) else {v} for f, v in dict(select).items()}
  return [r for r in records if all(value(r, f) in ok for f, ok in allowed.items())]


def _cache_dir(cfg: ml_collections.ConfigDict) -> str | None:
  """The image cache folder of a data config (None: `cache_dir='none'`, no cache)."""
  from agejax.data.cache import default_cache_dir

  cache_dir = cfg.cache_dir or default_cache_dir()
  return None if cache_dir == "none" else cache_dir


def _decode(cfg: ml_collections.ConfigDict, paths: list[str], rejections: Rejections) -> tuple[np.ndarray, np.ndarray]:
  """(images, kept) of `paths` decoded, resized and framed as the data config says (agejax.data.cache)."""
  from agejax.data.cache import load_images

  return load_images(paths, cfg.resize, _cache_dir(cfg), resize=cfg.resize_mode, rejections=rejections,
                     pad_fraction=cfg.pad_fraction, pad_mode=cfg.pad_mode, crop_fraction=cfg.crop_fraction)


def _with_rotations(images: np.ndarray, angles: tuple[float, ...]) -> np.ndarray:
  """Each image followed by its rotated versions."""
  from agejax.data.images import rotated_versions

  return np.concatenate([np.stack([im, *rotated_versions(im, angles)]) for im in images])


def _kept_records(cfg: ml_collections.ConfigDict, records: list[AgeRecord], seed: int) -> list[AgeRecord]:
  """The records `select` keeps, then a seeded random `max_records` of them (0: all)."""
  if cfg.select:
    n_read = len(records)
    records = select_records(records, cfg.select)
    if not records:
      raise ConfigError(f"config.data.select={dict(cfg.select)!r} keeps none of the {n_read} records")
    log.info("data: select %s keeps %d of %d records", dict(cfg.select), len(records), n_read)
  if cfg.max_records:
    rng = np.random.default_rng([seed, 12])
    keep = np.sort(rng.choice(len(records), size=min(cfg.max_records, len(records)), replace=False))
    records = [records[i] for i in keep]
  return records


def _limited_pool(cfg: ml_collections.ConfigDict, pool_idx: list[int], seed: int, info: dict) -> list[int]:
  """A seeded random `pool_limit` of the pool (0: all), never its first files: the pool comes in file order, and
  UTKFace's names start with the age, so its first 600 files are all aged 10-13 or 100+."""
  if not cfg.pool_limit or len(pool_idx) <= cfg.pool_limit:
    return pool_idx
  rng = np.random.default_rng([seed, 13])
  info["pool_limit"] = int(cfg.pool_limit)
  return sorted(rng.choice(np.asarray(pool_idx), size=cfg.pool_limit, replace=False).tolist())


def _from_records(cfg: ml_collections.ConfigDict, seed: int) -> StudyData:
  from agejax.data.cache import validate_images

  records, rejections = _records(cfg)
  records = _kept_records(cfg, records, seed)
  # Every record is decoded BEFORE duplicate grouping and the split (cached on disk, keyed by the file list and
  # size; cache_dir 'none' turns the cache off): an undecodable or empty file is rejected by name as a corrupt
  # image, so it never joins a duplicate group nor leaves a hole in the test set. When the config keeps only part
  # of the data (pool_limit, split_lists), every file is validated on a small decode and only the kept ones are
  # decoded at full size; otherwise the one full-size decode validates them.
  paths = [r.path for r in records]
  subset = bool(cfg.pool_limit or cfg.split_lists)
  if subset:
    images, kept = None, validate_images(paths, _cache_dir(cfg), rejections)
  else:
    images, kept = _decode(cfg, paths, rejections)
  records = [records[k] for k in kept]
  for line in rejections.summary():
    (log.warning if rejections.rejected else log.info)("data: %s", line)
  if not records:
    raise ConfigError(f"config.data.root={cfg.root!r}: none of the {cfg.name} images decodes")
  pool_idx, test_idx, info = _split(cfg, records, seed)
  pool_idx = _limited_pool(cfg, pool_idx, seed, info)
  rows = np.arange(len(records))
  if subset:  # already validated: a file that fails now changed meanwhile, and stops the run naming it
    needed = sorted(set(pool_idx) | set(test_idx))
    images, _ = _decode(cfg, [records[i].path for i in needed], Rejections("strict"))
    rows[needed] = np.arange(len(needed))
  pool_images, pool_recs = images[rows[np.asarray(pool_idx, np.int64)]], [records[i] for i in pool_idx]
  test_images, test_recs = images[rows[np.asarray(test_idx, np.int64)]], [records[i] for i in test_idx]
  angles = tuple(cfg.rotation_angles or ())
  pool_groups = np.arange(len(pool_recs))
  if angles:  # the paper stores every LAP training image with rotated versions, drawn together
    pool_images = _with_rotations(pool_images, angles)
    pool_groups = np.repeat(pool_groups, len(angles) + 1)
  pool_ages = np.repeat(np.array([r.age for r in pool_recs], np.float32), len(angles) + 1)
  sig = [r.age_std for r in test_recs]
  test_sigma = np.array(sig, np.float32) if all(s is not None for s in sig) else None
  info.update(source=cfg.name, root=cfg.root, pool_bases=len(pool_recs), test=len(test_recs),
              rotations=len(angles), rejected=rejections.counts_by_reason(), rejected_files="data_report.json",
              select={k: list(v) if isinstance(v, (list, tuple)) else v for k, v in dict(cfg.select or {}).items()})
  log.info("data: %d pool images (%d bases), %d test images", len(pool_images), len(pool_recs), len(test_recs))
  return StudyData(pool_images, pool_ages, pool_groups, [r.path for r in pool_recs], test_images,
                   np.array([r.age for r in test_recs], np.float32), test_sigma, [r.path for r in test_recs],
                   rejections, info)


# The fields a prior entry may set in its own `data` section: how each image is framed, never which images
# are drawn (every prior of a study sees the same pool, test set and draws).
VIEW_FIELDS = ("pad_fraction", "pad_mode", "crop_fraction", "resize_mode")


def check_view(overrides: Mapping[str, Any], where: str) -> None:
  """A prior's own `data` section may only re-frame the images (VIEW_FIELDS)."""
  unknown = sorted(set(overrides) - set(VIEW_FIELDS))
  if unknown:
    raise ConfigError(f"{where}: {', '.join(unknown)} cannot differ between priors (a prior's data section may "
                      f"set only {', '.join(VIEW_FIELDS)}: the pool, test set and draws are the study's)")


def data_view(data: StudyData, study_cfg: Mapping[str, Any], view_cfg: Mapping[str, Any]) -> StudyData:
  """The same split framed as `view_cfg` says (its VIEW_FIELDS): the pool and test images decoded again when
  they differ from `study_cfg`'s, else `data` itself."""
  merged, study_cfg = _section(view_cfg), _section(study_cfg)
  view = {k: merged[k] for k in VIEW_FIELDS if merged[k] != study_cfg[k]}
  if not view or data.info.get("source") == "synthetic":
    return data
  angles = tuple(merged.rotation_angles or ())
  pool, _ = _decode(merged, data.pool_names, Rejections("strict"))
  if angles:  # the rotated versions follow each base image, as in _from_records
    pool = _with_rotations(pool, angles)
  test, _ = _decode(merged, data.test_names, Rejections("strict"))
  log.info("data view %s: %d pool and %d test images decoded again", view, len(pool), len(data.test_names))
  return dataclasses.replace(data, pool_images=pool, test_images=test)
