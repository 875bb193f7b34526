"""Diagnostics of a finished run: selections, suspected label errors, duplicates, plots, TensorBoard and the CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from agejax.data.synthetic import synthetic_dataset
from agejax.reports import diagnostics as diag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_worst_and_band_selections():
  err = np.array([1.0, -45.0, 17.0, 50.0, -16.0, 3.0, 19.5, 40.0])
  assert list(diag.worst_errors(err, 40, k=4)) == [3, 1, 7]  # every |error| >= 40, largest first
  assert list(diag.worst_errors(err / 10, 40, k=2)) == [3, 1]  # none that large: the k largest
  band = diag.band_errors(err, 15, 20, k=10, seed=0)
  assert sorted(band) == [2, 4, 6]
  assert len(diag.band_errors(err, 15, 20, k=2, seed=0)) == 2


def test_label_suspects_need_agreement():
  names = ["a.jpg", "b.jpg", "c.jpg"]
  ages = np.array([20.0, 30.0, 70.0])
  runs = {"m1-frozen": {"names": names, "ages": ages, "preds": np.array([65.0, 31.0, 20.0])},
          "m1-full": {"names": names, "ages": ages, "preds": np.array([60.0, 55.0, 68.0])}}
  suspects = diag.label_suspects(runs, threshold=20)
  assert [(s["path"], s["agree"], s["direction"]) for s in suspects] == [("a.jpg", 2, "older")]
  one = diag.label_suspects({"m1-full": runs["m1-full"]}, threshold=20)
  assert {s["path"] for s in one} == {"a.jpg", "b.jpg"}


@pytest.fixture
def finished_workdir(tmp_path):
  """A workdir as the transfer study leaves it: splits, predictions of two runs, real image files."""
  work = tmp_path / "w"
  images, ages = synthetic_dataset(24, 32, seed=3)
  paths = []
  for i, im in enumerate(images):
    paths.append(str(tmp_path / "img" / f"{i:02d}.png"))
    os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
    Image.fromarray(im).save(paths[-1])
  shutil.copy(paths[0], str(tmp_path / "img" / "copy_of_00.png"))  # an exact duplicate across splits
  train, test = paths[:12], paths[12:]
  diag.write_split(str(work / "splits" / "train.txt"), train, ages[:12])
  diag.write_split(str(work / "splits" / "test.txt"), test + [str(tmp_path / "img" / "copy_of_00.png")],
                   list(ages[12:]) + [ages[0]])
  pred = ages[12:] + np.random.default_rng(0).normal(0, 4, 12)
  pred[0] = ages[12] + 50  # a gross error both runs make: a suspected label error
  diag.append_predictions(str(work / diag.PREDICTIONS_FILE), "tiny-frozen", test, ages[12:], pred)
  pred2 = pred.copy()
  pred2[1] = ages[13] + 17  # a band error of one run only
  diag.append_predictions(str(work / diag.PREDICTIONS_FILE), "tiny-full", test, ages[12:], pred2)
  return work, test


def test_run_diagnostics_writes_plots_report_and_tensorboard(finished_workdir):
  from agejax.reports.tensorboard import Logger

  work, test = finished_workdir
  with Logger(str(work / "tb"), enabled=True) as tb:
    report = diag.run_diagnostics(str(work), logger=tb, options={"near": True})
  out = work / "diagnostics"
  for name in ("scatter_tiny-frozen.png", "scatter_tiny-full.png", "gallery_worst_tiny-full.png",
               "gallery_band_tiny-full.png", "age_histograms.png", "report.md", "report.json"):
    assert (out / name).exists(), name
  assert (out / "scatter_tiny-full.png").read_bytes()[:4] == b"\x89PNG"
  assert report["runs"]["tiny-full"]["gross_errors"] == 1 and report["runs"]["tiny-full"]["band_errors"] >= 1
  exact = report["duplicates"]["exact"]
  assert exact["groups"] == 1 and exact["cross_split_groups"] == 1
  assert [s["path"] for s in report["label_suspects"]] == [test[0]]
  assert report["label_suspects"][0]["agree"] == 2
  assert "Suspected label errors (1)" in (out / "report.md").read_text()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(work / "tb"))
  saved = json.loads((out / "report.json").read_text())
  assert saved["duplicates"]["checked_files"] == 25


def test_cli_on_a_finished_workdir(finished_workdir):
  work, _ = finished_workdir
  r = subprocess.run([sys.executable, "-m", "agejax.reports.diagnostics", "--workdir", str(work), "--no-near"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "# Diagnostics" in r.stdout and "tiny-frozen" in r.stdout
  assert (work / "diagnostics" / "gallery_worst_tiny-frozen.png").exists()
  assert diag.main(["--workdir", str(work / "nope")]) == 1


def test_source_histograms_from_stage_files(tmp_path):
  stage = tmp_path / "priors" / "matched-100-abc"
  stage.mkdir(parents=True)
  hist = {"source": [0] * 20 + [5] * 81, "resampled": [0] * 20 + [1] * 81, "target": [3] * 101}
  (stage / "pretrain_stage.json").write_text(json.dumps({"name": "matched-100", "mode": "matched",
                                                          "histograms": hist}))
  report = diag.run_diagnostics(str(tmp_path), options={"near": False})
  assert (tmp_path / "diagnostics" / "source_distributions.png").exists()
  assert report["stages"]["matched-100"] == {"source": 405, "resampled": 81, "target": 303, "mode": "matched"}
  assert any("predictions.csv" in s for s in report["skipped"])
