"""Metrics against scipy.stats and direct numpy formulas, plus the edge cases a run can hit."""

import warnings

import numpy as np
import pytest
from scipy import stats

from agejax.engine import metrics


@pytest.fixture
def ages():
  rng = np.random.default_rng(0)
  true = rng.uniform(0, 100, size=500)
  pred = true + rng.normal(0, 6, size=500)
  return pred, true


def test_mae_and_cs_match_numpy(ages):
  pred, true = ages
  err = np.abs(pred - true)
  assert metrics.mae(pred, true) == pytest.approx(err.mean(), rel=1e-12)
  assert metrics.cs_at_k(pred, true) == pytest.approx(np.mean(err <= 5))
  assert metrics.cs_at_k(pred, true, k=10) == pytest.approx(np.mean(err <= 10))
  # The bound is inclusive.
  assert metrics.cs_at_k([10.0, 15.0, 16.0], [10.0, 10.0, 10.0]) == pytest.approx(2 / 3)


def test_eps_error_matches_formula(ages):
  pred, true = ages
  sigma = np.random.default_rng(1).uniform(1, 8, size=true.size)
  want = np.mean(1 - np.exp(-((pred - true) ** 2) / (2 * sigma**2)))
  assert metrics.eps_error(pred, true, sigma) == pytest.approx(want, rel=1e-12)
  assert metrics.eps_error(pred, true, 4.0) == pytest.approx(np.mean(1 - np.exp(-((pred - true) ** 2) / 32)))
  assert metrics.eps_error(true, true, sigma) == 0.0


def test_eps_error_zero_sigma_is_the_limit():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    value = metrics.eps_error([30.0, 31.0, 50.0, 20.0], [30.0, 30.0, 50.0, 25.0], [0.0, 0.0, 2.0, 0.0])
  # exact hit with sigma 0 -> 0, misses with sigma 0 -> 1, exact hit with sigma 2 -> 0
  assert value == pytest.approx(0.5)
  with pytest.raises(ValueError):
    metrics.eps_error([1.0, 2.0], [1.0, 2.0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError):
    metrics.eps_error([1.0], [1.0], [-1.0])


def test_correlations_match_scipy(ages):
  pred, true = ages
  assert metrics.plcc(pred, true) == pytest.approx(stats.pearsonr(pred, true)[0], abs=1e-12)
  assert metrics.srocc(pred, true) == pytest.approx(stats.spearmanr(pred, true)[0], abs=1e-12)
  # Integer ages bring many ties; ranks must be averaged as scipy does.
  rounded_pred, rounded_true = np.round(pred / 10), np.round(true / 7)
  assert metrics.srocc(rounded_pred, rounded_true) == pytest.approx(
    stats.spearmanr(rounded_pred, rounded_true)[0], abs=1e-12)
  assert metrics.plcc(-pred, true) == pytest.approx(-metrics.plcc(pred, true))


def test_constant_predictions_give_nan_quietly():
  true = np.arange(20.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert np.isnan(metrics.plcc(np.full(20, 0.1), true))
    assert np.isnan(metrics.srocc(np.full(20, 33.0), true))
    assert np.isnan(metrics.plcc([1.0], [2.0]))
    assert np.isnan(metrics.plcc([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
    out = metrics.age_metrics(np.full(20, 33.0), true)
  assert out["mae"] == pytest.approx(np.mean(np.abs(33.0 - true)))
  assert np.isnan(out["plcc"]) and np.isnan(out["srocc"])


def test_age_metrics_keys_and_values(ages):
  pred, true = ages
  out = metrics.age_metrics(pred.reshape(50, 10), true)
  assert tuple(out) == metrics.METRIC_NAMES
  assert np.isnan(out["eps_error"])
  assert all(isinstance(v, float) for v in out.values())
  assert out["srocc"] == pytest.approx(stats.spearmanr(pred, true)[0])
  with_sigma = metrics.age_metrics(pred, true, sigma=np.full(true.size, 5.0))
  assert 0 < with_sigma["eps_error"] < 1
  assert "plcc" in metrics.format_metrics(out) and "eps_error" not in metrics.format_metrics(out)


def test_shape_mismatch_and_empty_raise():
  with pytest.raises(ValueError, match="3 values"):
    metrics.mae([1.0, 2.0, 3.0], [1.0, 2.0])
  with pytest.raises(ValueError):
    metrics.age_metrics([], [])
