"""Age histograms and the uniform / matched / original resampling (docs/protocol.md, imposing a label distribution)."""

import numpy as np
import pytest

from agejax.data.distribution import age_histogram, apportion, resample_indices


def test_histogram_rounds_and_clips():
  h = age_histogram([0.4, 0.6, 25, 25.2, 130, -2], max_age=100)
  assert len(h) == 101 and h[0] == 2 and h[1] == 1 and h[25] == 2 and h[100] == 1 and h.sum() == 6


def test_apportion_sums_exactly():
  rng = np.random.default_rng(0)
  c = apportion(np.array([1.0, 1, 1, 0]), 10, rng)
  assert c.sum() == 10 and c[3] == 0 and c.max() - c[:3].min() == 1


@pytest.fixture
def source():
  rng = np.random.default_rng(3)
  return np.clip(rng.normal(35, 10, 4000), 0, 100).round()


def test_uniform_equal_counts_per_age(source):
  total = 4 * len(source)
  idx = resample_indices(source, "uniform", total, seed=1)
  assert len(idx) == total and idx.min() >= 0 and idx.max() < len(source)
  got = age_histogram(source[idx])
  covered = age_histogram(source) > 0
  assert (got[~covered] == 0).all()
  assert got[covered].max() - got[covered].min() <= 1  # equal shares over the ages the source has


def test_without_replacement_where_enough(source):
  idx = resample_indices(source, "uniform", 202, seed=0)  # 2 per age: buckets near 35 have plenty
  ages = source[idx]
  for a in (30, 35, 40):
    chosen = idx[ages == a]
    assert len(chosen) == len(set(chosen.tolist()))
  short = np.flatnonzero(age_histogram(source) == 1)
  if len(short):  # a bucket of one must be repeated
    assert (source[idx] == short[0]).sum() >= 2


def test_matched_follows_target(source):
  target = np.clip(np.random.default_rng(9).normal(60, 5, 500), 0, 100)
  idx = resample_indices(source, "matched", 4 * len(source), target_ages=target, seed=0)
  want = age_histogram(target) * 4 * len(source) / len(target)
  got = age_histogram(source[idx])
  covered = age_histogram(source) > 0
  assert np.corrcoef(got[covered], want[covered])[0, 1] > 0.99
  with pytest.raises(ValueError, match="target_ages"):
    resample_indices(source, "matched", 10)


def test_original_and_determinism(source):
  idx = resample_indices(source, "original", 1000, seed=5)
  assert len(set(idx.tolist())) == 1000
  draw = lambda seed: resample_indices(source, "uniform", 500, seed=seed)
  assert (draw(2) == draw(2)).all() and not (draw(2) == draw(3)).all()
  with pytest.raises(ValueError, match="mode"):
    resample_indices(source, "bogus", 10)
