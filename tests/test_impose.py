"""Imposed-distribution priors: resampling, pre-training stages (stop rules, chaining, reuse by hash) and the
impose configs end to end, CI-sized."""

import json
import os

import numpy as np
import pytest
from fake_weights import random_variables

from agejax.data.distribution import age_histogram
from agejax.errors import ConfigError
from agejax.experiments import pretrain
from agejax.main import run_config
from agejax.models import build_model
from agejax.models.pretrained import Preprocess, save_pretrained
from configs import lap, lap_impose, morph_impose, utkface_impose

PRE = Preprocess("RGB", 1.0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 36, 32)
SYNTHETIC_SOURCE = dict(name="synthetic", pool_size=300, test_size=40, skew=0.8)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
  from agejax.main import enable_compilation_cache

  enable_compilation_cache()


def tiny_prior(path: str, head: str = "dex") -> str:
  spec = dict(arch="vgg16", head=head, num_classes=10, backbone=dict(width=1 / 16, fc_dim=32))
  save_pretrained(path, spec, random_variables(build_model(spec), 32), PRE)
  return path


def _stage(prior_dir: str, name: str) -> dict:
  (path,) = [d for d in os.listdir(prior_dir) if d.rsplit("-", 1)[0] == name]
  with open(os.path.join(prior_dir, path, pretrain.STAGE_FILE)) as f:
    return json.load(f)


def _within_apportionment(resampled: np.ndarray, target: np.ndarray, source: np.ndarray) -> bool:
  """Counts are the target's shares of the total, rounded (largest remainders): each within 1 of exact."""
  w = np.where(source > 0, target, 0).astype(float)
  exact = w / w.sum() * resampled.sum()
  return bool(np.all(np.abs(resampled - exact) < 1 + 1e-9))


def test_resampled_training_set_matches_the_target():
  rng = np.random.default_rng(0)
  source = rng.integers(15, 80, 5000).astype(float)
  target = np.concatenate([rng.integers(1, 10, 300), rng.integers(20, 40, 700)]).astype(float)
  for total in (100, 1000, 0):
    idx = pretrain.draw_training_set(source, {"mode": "matched", "total": total}, target, seed=1)
    assert len(idx) == (total or 5000)
    assert _within_apportionment(age_histogram(source[idx]), age_histogram(target), age_histogram(source))
    assert age_histogram(source[idx])[:15].sum() == 0  # no source sample that young: its share goes elsewhere
  uniform = pretrain.draw_training_set(source, {"mode": "uniform", "total": 0, "multiple": 4.0}, None, seed=1)
  hist = age_histogram(source[uniform])[15:80]
  assert len(uniform) == 20000 and hist.max() - hist.min() <= 1
  assert np.array_equal(pretrain.draw_training_set(source, None, None, 0), np.arange(5000))


def test_stage_key_covers_the_definition_and_the_parent(tmp_path):
  c = lap_impose.get_config("dex=/d,imdb=/i")
  (e100,) = [e for e in c.priors if e["name"] == "lap-matched-100"]
  ages = np.arange(50, dtype=float)
  key = pretrain.stage_key(e100, c, ages)
  assert key == pretrain.stage_key(dict(e100), c, ages.copy())
  changed = {**e100, "pretrain": {**e100["pretrain"], "distribution": {"mode": "matched", "total": 101}}}
  assert pretrain.stage_key(changed, c, ages) != key
  assert pretrain.stage_key(e100, c, ages + 1) != key  # another target distribution
  u = utkface_impose.get_config("runlocal,lite0=/l")
  child = [e for e in u.priors if e["name"] == "matched-100"][0]
  before = pretrain.stage_key(child, u, ages)
  u.priors[1]["pretrain"]["epochs"] = 2.5  # the parent stage ('source') changes: so does the child's hash
  assert pretrain.stage_key(child, u, ages) != before


def test_lap_config_has_table1_columns():
  c = lap.get_config("dex=/d,imdb=/i,vggface=/v,imagenet=/n")
  assert [p["name"] for p in c.priors] == ["dex", "imdb-uniform", "imdb-original", "imdb-lap-matched", "vggface",
                                           "imagenet"]
  uniform, original, matched = c.priors[1:4]
  assert uniform["pretrain"]["distribution"] == {"mode": "uniform", "total": 0, "multiple": 4.0}
  assert (uniform["pretrain"]["stop"], uniform["pretrain"]["epochs"], uniform["pretrain"]["optim"]["base_lr"]) == \
      ("fixed", 1.0, 1e-5)
  assert "distribution" not in original["pretrain"] and original["pretrain"]["stop"] == "converge"
  # the authors' fixed-length stage on the matched source: 250k steps of 15, lr x0.1 every 100k, the test histogram
  m = matched["pretrain"]
  assert m["distribution"]["mode"] == "matched" and m["distribution"]["target"] == "test"
  assert (m["stop"], m["steps"], m["stepsize"], m["batch_size"]) == ("fixed", 250000, 100000, 15)
  assert all(p["pretrain"]["data"]["root"] == "/i" and p["pretrain"]["data"]["rotation_angles"] == ()
             for p in c.priors[1:4])


@pytest.fixture(scope="module")
def lap_impose_run(tmp_path_factory):
  """configs/lap_impose.py with synthetic target and source data and a tiny DEX stand-in."""
  tmp = tmp_path_factory.mktemp("lap_impose")
  dex = tiny_prior(str(tmp / "dex"))
  c = lap_impose.get_config(f"dex={dex},imdb=unused")
  c.data.update(name="synthetic", resize=36, crop=32, pool_size=120, test_size=60, rotation_angles=())
  c.sizes = [(3, 2, 3, 4)]
  c.steps_scale, c.min_steps = 1.0, 1
  priors = [p for p in c.priors if p["name"] in ("dex", "lap-matched-100", "lap-matched-all")]
  for p in priors[1:]:  # early stopping with an epoch cap instead of the authors' fixed 68 / 250k steps of 15
    p["pretrain"].update(data=SYNTHETIC_SOURCE, val_size=30, patience=1, eval_every=5, stop="converge", steps=0,
                         stepsize=0, batch_size=10)
  priors[1]["pretrain"]["epochs"] = 3.0  # 100 samples: 10 steps an epoch at batch 10
  priors[2]["pretrain"].update(epochs=1.0, distribution={"mode": "matched", "total": 0})
  c.priors = priors
  c.trials.parallel = "loop"
  c.trials.conv_impl = "spec"  # no per-layer timing in CI
  c.save_trials = "none"
  c.progress = False
  rows = run_config(c, str(tmp / "w"))
  return tmp / "w", rows, c


def test_lap_impose_end_to_end(lap_impose_run):
  work, rows, _ = lap_impose_run
  assert {(r["prior"], r["n_train"]) for r in rows} == {(p, n) for p in ("dex", "lap-matched-100", "lap-matched-all")
                                                        for n in (0, 3)}
  assert all(np.isfinite(r["mae"]) for r in rows)
  assert "| n_train | dex | lap-matched-100 | lap-matched-all | trials |" in (work / "table.md").read_text()
  assert (work / "learning_curve.png").exists() and (work / "diagnostics" / "source_distributions.png").exists()
  s100, s_all = _stage(str(work / "priors"), "lap-matched-100"), _stage(str(work / "priors"), "lap-matched-all")
  assert s100["samples"] == 100 and s100["val_images"] == 30 and s100["best_step"] <= s100["steps_run"] <= 30
  assert s_all["samples"] == s_all["source_pool"] == 270  # 300 in the synthetic pool, 30 held out
  for s in (s100, s_all):  # the target is the study's training pool
    h = {k: np.asarray(v) for k, v in s["histograms"].items()}
    assert np.array_equal(h["target"], age_histogram(np.asarray(_pool_ages(work))))
    assert _within_apportionment(h["resampled"], h["target"], h["source"])
    assert all(np.isfinite(r["val_mae"]) for r in s["history"])


def _pool_ages(work) -> np.ndarray:
  from agejax.data.synthetic import synthetic_ages

  return synthetic_ages(120, seed=0 * 7 + 1)  # configs seed 0: the synthetic pool of the study


def test_rerun_reuses_stages_and_rows(lap_impose_run, caplog):
  work, _, c = lap_impose_run
  stage_files = sorted((work / "priors").glob("*/pretrain_stage.json"))
  mtimes = [f.stat().st_mtime_ns for f in stage_files]
  before = (work / "results.csv").read_text()
  c.diagnostics = False
  with caplog.at_level("INFO"):
    run_config(c, str(work))
  # every (prior, size) is in results.csv: nothing is trained again, not even the stages
  assert caplog.text.count("rerun skips the sizes already in results.csv (0, 3); to do: none") == 3
  assert [f.stat().st_mtime_ns for f in sorted((work / "priors").glob("*/pretrain_stage.json"))] == mtimes
  assert (work / "results.csv").read_text() == before


def test_missing_paths_are_config_errors(tmp_path):
  for module in (lap_impose, morph_impose):
    with pytest.raises(ConfigError, match=r"config\.data\.root"):
      run_config(module.get_config("dex=/d,imdb=/i"), str(tmp_path / module.__name__))
  c = morph_impose.get_config("dex=/d")
  c.data.update(name="synthetic", resize=36, crop=32, pool_size=40, test_size=20)
  c.priors = [p for p in c.priors if p["name"] == "morph-matched-100"]
  with pytest.raises(ConfigError, match=r"config\.priors\[morph-matched-100\]\.pretrain\.data\.root"):
    run_config(c, str(tmp_path / "imdb"))
  c = morph_impose.get_config("imdb=/i")
  c.data.update(name="synthetic", resize=36, crop=32, pool_size=40, test_size=20)
  with pytest.raises(ConfigError, match=r"priors\[dex\] needs `dir`"):
    run_config(c, str(tmp_path / "dex"))


def test_utkface_impose_on_real_faces(utkface_root, tmp_path):
  """configs/utkface_impose.py on small subsets of the real folder: Asian target, White source, chained stages."""
  lite0 = tiny_prior(str(tmp_path / "lite0"), head="classes")
  c = utkface_impose.get_config(f"runlocal,lite0={lite0},res=32")
  c.data.update(root=utkface_root, max_records=260, test_size=60, cache_dir=str(tmp_path / "cache"))
  keep = ("source", "matched-100")  # a chained pair: 'source' trains on race 0, 'matched-100' continues from it
  c.priors = [p for p in c.priors if p["name"] in keep]
  for p in c.priors:
    p["backbone_overrides"] = {}  # the tiny stand-in is a VGG (no BatchNorm to freeze)
    p["pretrain"]["data"].update(root=utkface_root, max_records=260, test_size=40, cache_dir=str(tmp_path / "cache"))
    p["pretrain"].update(epochs=1.0, patience=1, optim=c.optim.to_dict())  # one optimiser: one compiled step
  c.model.regression_hidden = (16, 8)
  c.sizes = [(3, 2, 3, 4)]
  c.trials.parallel = "loop"
  c.trials.conv_impl = "spec"  # no per-layer timing in CI
  c.save_trials = "none"
  c.progress = False
  rows = run_config(c, str(tmp_path / "w"))
  assert {r["prior"] for r in rows} == set(keep) and all(np.isfinite(r["mae"]) for r in rows)
  info = json.loads((tmp_path / "w" / "data_info.json").read_text())
  assert info["select"] == {"race": [2]}
  test_names = [line.split("\t")[0] for line in (tmp_path / "w" / "splits" / "test.txt").read_text().splitlines()
                if not line.startswith("#")]
  assert all(os.path.basename(n).split("_")[2] == "2" for n in test_names)  # the target: Asian faces only
  source, matched = _stage(str(tmp_path / "w" / "priors"), "source"), _stage(str(tmp_path / "w" / "priors"),
                                                                             "matched-100")
  assert source["definition"]["pretrain"]["data"]["select"] == {"race": [0]}
  assert matched["samples"] == 100
  h = {k: np.asarray(v) for k, v in matched["histograms"].items()}
  assert _within_apportionment(h["resampled"], h["target"], h["source"])
  # the source (White) is older than the target (Asian); the resampled set follows the target
  mean = lambda hist: float(np.sum(np.arange(101) * hist) / hist.sum())  # noqa: E731
  assert mean(h["source"]) > mean(h["target"]) + 5 and abs(mean(h["resampled"]) - mean(h["target"])) < 5
  assert (tmp_path / "w" / "diagnostics" / "source_distributions.png").exists()
