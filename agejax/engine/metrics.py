"""Age-estimation metrics on host arrays: MAE, epsilon-error, CS@k, PLCC and SROCC (docs/protocol.md §8).

All functions flatten their inputs, compute in float64 and return Python floats. Correlations of a constant
input are undefined and come back as nan, quietly.
"""

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

METRIC_NAMES = ("mae", "eps_error", "cs5", "plcc", "srocc")


def _pair(pred: ArrayLike, true: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """Flattens two arrays to float64 and checks that they hold the same, non-zero number of values."""
  p = np.asarray(pred, dtype=np.float64).ravel()
  t = np.asarray(true, dtype=np.float64).ravel()
  if p.shape != t.shape:
    raise ValueError(f"predictions have {p.size} values but targets have {t.size}")
  if p.size == 0:
    raise ValueError("no predictions to score")
  return p, t


def mae(pred: ArrayLike, true: ArrayLike) -> float:
  """Mean absolute error."""
  p, t = _pair(pred, true)
  return float(np.mean(np.abs(p - t)))


def eps_error(pred: ArrayLike, mu: ArrayLike, sigma: ArrayLike) -> float:
  """ChaLearn LAP epsilon-error, mean(1 - exp(-(x - mu)^2 / (2 sigma^2))), with vote mean mu and SD sigma.

  A zero sigma (all voters agreed) is taken in the limit sigma -> 0: the error is 0 for an exact hit and 1
  for any miss. `sigma` may be a scalar or one value per image.
  """
  p, m = _pair(pred, mu)
  s = np.asarray(sigma, dtype=np.float64).ravel()
  if s.size not in (1, p.size):
    raise ValueError(f"sigma has {s.size} values; expected 1 or {p.size}")
  s = np.broadcast_to(s, p.shape)
  if np.any(s < 0):
    raise ValueError("sigma must be non-negative")
  sq = (p - m) ** 2
  with np.errstate(divide="ignore", invalid="ignore"):
    z = sq / (2.0 * s**2)
  z = np.where(s > 0, z, np.where(sq == 0, 0.0, np.inf))
  return float(np.mean(1.0 - np.exp(-z)))


def cs_at_k(pred: ArrayLike, true: ArrayLike, k: float = 5) -> float:
  """Cumulative score: the share of predictions whose absolute error is at most k years."""
  p, t = _pair(pred, true)
  return float(np.mean(np.abs(p - t) <= k))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata's 'average')."""
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  starts_group = np.r_[True, xs[1:] != xs[:-1]]
  group = np.cumsum(starts_group) - 1
  starts = np.flatnonzero(starts_group)
  ends = np.r_[starts[1:], x.size]
  ranks = np.empty(x.size)
  ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[group]
  return ranks


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation; nan for fewer than two values, a constant input, or non-finite values."""
  if x.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    return float("nan")
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  xc, yc = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
  if denom == 0:
    return float("nan")
  return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def plcc(pred: ArrayLike, true: ArrayLike) -> float:
  """Pearson linear correlation coefficient; nan when either input is constant."""
  return _correlation(*_pair(pred, true))


def srocc(pred: ArrayLike, true: ArrayLike) -> float:
  """Spearman rank-order correlation coefficient (ties get average ranks); nan when either input is constant."""
  p, t = _pair(pred, true)
  if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t))):
    return float("nan")
  return _correlation(_average_ranks(p), _average_ranks(t))


def age_metrics(pred: ArrayLike, true: ArrayLike, sigma: ArrayLike | None = None) -> dict[str, float]:
  """Every metric a run reports, keyed as METRIC_NAMES; eps_error is nan when no vote SD is given."""
  p, t = _pair(pred, true)
  return {
    "mae": mae(p, t),
    "eps_error": eps_error(p, t, sigma) if sigma is not None else float("nan"),
    "cs5": cs_at_k(p, t, 5),
    "plcc": plcc(p, t),
    "srocc": srocc(p, t),
  }


def format_metrics(metrics: Mapping[str, float]) -> str:
  """One log line such as 'mae 3.294 | cs5 0.812 | ...', skipping metrics that are nan."""
  return " | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if not np.isnan(v))
