"""Age histograms and the label-distribution resampling of docs/protocol.md (imposing a label distribution, eqs. 2-3).

Eq. 2 (uniform): n(age) = 4 N / 101 for each age 0..100, N the source size; eq. 3 (matched):
n(age) = n_target(age) * 4 N / N_target. Both are shares of a total (4 N in the paper), so here the
total drawn is an argument and the per-age counts are its apportionment over the chosen weights.
"""

from typing import Literal

import numpy as np

Mode = Literal["uniform", "matched", "original"]


def age_bins(ages, max_age: int = 100) -> np.ndarray:
  """Ages rounded to whole years and clipped to 0..max_age, as integer bin indices."""
  a = np.asarray(ages, dtype=np.float64)
  if np.isnan(a).any():
    raise ValueError("ages contain NaN")
  return np.clip(np.rint(a), 0, max_age).astype(np.int64)


def age_histogram(ages, max_age: int = 100) -> np.ndarray:
  """Counts per whole-year age 0..max_age (length max_age + 1)."""
  return np.bincount(age_bins(ages, max_age), minlength=max_age + 1)


def apportion(weights: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
  """Integer counts summing to `total` proportional to `weights` (largest remainders, ties broken by `rng`)."""
  w = np.asarray(weights, dtype=np.float64)
  raw = w / w.sum() * total
  counts = np.floor(raw).astype(np.int64)
  short = total - int(counts.sum())
  if short:
    frac = np.where(w > 0, raw - counts, -1.0)
    order = np.lexsort((rng.random(len(w)), -frac))
    counts[order[:short]] += 1
  return counts


def _draw(members: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """`n` of `members`: without replacement when enough, else every member once plus draws with replacement."""
  if n <= len(members):
    return rng.choice(members, n, replace=False)
  return np.concatenate([members, rng.choice(members, n - len(members), replace=True)])


def resample_indices(source_ages, mode: Mode, total: int, target_ages=None, seed: int = 0,
                     max_age: int = 100) -> np.ndarray:
  """Indices into `source_ages` drawing `total` samples with the label distribution `mode`.

  uniform:  equal counts per age 0..max_age (eq. 2; the paper's total is 4 * len(source)).
  matched:  counts proportional to the histogram of `target_ages` (eq. 3).
  original: a uniform draw over the source (its own distribution).
  Ages with no source sample cannot be drawn; their share goes to the other ages by the same weights.
  Deterministic for a given seed; the result is shuffled.
  """
  rng = np.random.default_rng(seed)
  bins = age_bins(source_ages, max_age)
  n_src = len(bins)
  if n_src == 0 or total <= 0:
    return np.zeros(0, dtype=np.int64)
  if mode == "original":
    return _draw(np.arange(n_src), total, rng)[rng.permutation(total)]
  if mode == "uniform":
    weights = np.ones(max_age + 1)
  elif mode == "matched":
    if target_ages is None or len(target_ages) == 0:
      raise ValueError("mode 'matched' needs target_ages")
    weights = age_histogram(target_ages, max_age).astype(np.float64)
  else:
    raise ValueError(f"mode must be 'uniform', 'matched' or 'original', got {mode!r}")
  src_hist = np.bincount(bins, minlength=max_age + 1)
  weights = np.where(src_hist > 0, weights, 0.0)
  if weights.sum() == 0:
    raise ValueError("no source sample has an age the target distribution covers")
  counts = apportion(weights, total, rng)
  order = np.argsort(bins, kind="stable")
  starts = np.concatenate([[0], np.cumsum(src_hist)])
  parts = [_draw(order[starts[a]:starts[a + 1]], int(counts[a]), rng) for a in np.flatnonzero(counts)]
  out = np.concatenate(parts).astype(np.int64)
  return out[rng.permutation(len(out))]
