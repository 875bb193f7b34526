"""The transfer study (frozen vs full fine-tuning) end to end, CI-sized, and its configs' errors."""

import csv
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from fake_weights import random_variables

from agejax.engine import fit as fit_lib
from agejax.engine.step import init_state
from agejax.errors import ConfigError
from agejax.main import run_config
from agejax.models import build_model
from agejax.models.pretrained import Preprocess, load_pretrained, save_pretrained
from configs import imdb_transfer, utkface_transfer

PRE = Preprocess("RGB", 1.0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, 32)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
  """The persistent XLA cache (in the session's private AGEJAX_CACHE): identical programs compile once."""
  from agejax.main import enable_compilation_cache

  enable_compilation_cache()


def tiny_prior(path: str, arch: str = "vgg16", **backbone) -> str:
  """A small ImageNet-style prior directory (a 10-class 'classes' head), random weights."""
  backbone = backbone or dict(width=1 / 16, fc_dim=32)
  spec = dict(arch=arch, head="classes", num_classes=10, backbone=backbone)
  save_pretrained(path, spec, random_variables(build_model(spec), 32), PRE)
  return path


def _small(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.model.regression_hidden = (16, 8)
  c.epochs = 2
  c.lr_decay_epochs = 1
  c.batch_size = 16
  c.eval_batch_size = 32
  c.progress = False
  return c


@pytest.fixture(scope="module")
def imdb_run(tmp_path_factory):
  """configs/imdb_transfer.py with synthetic images in place of IMDB and a tiny prior in place of MobileNetV2."""
  tmp = tmp_path_factory.mktemp("imdb_transfer")
  prior = tiny_prior(str(tmp / "prior"))
  c = _small(imdb_transfer.get_config(f"mobilenet_v2={prior}"))
  c.data.update(name="synthetic", resize=32, crop=32, pool_size=96, test_size=40, val_size=32, train_size=0,
                max_records=0)
  rows = run_config(c, str(tmp / "w"))
  return tmp / "w", rows, c


def test_outputs_metrics_and_table(imdb_run):
  work, rows, _ = imdb_run
  assert [(r["backbone"], r["mode"]) for r in rows] == [("MobileNet_V2", "frozen"), ("MobileNet_V2", "full")]
  for r in rows:
    assert all(np.isfinite(float(r[k])) for k in ("test_mae", "plcc", "srocc", "val_mae"))
    assert (int(r["train_images"]), int(r["val_images"]), int(r["test_images"])) == (64, 32, 40)
  table = (work / "table.md").read_text()
  assert "| MobileNet_V2 | Linear layers fine-tuned |" in table and "| MobileNet_V2 | All layers fine-tuned |" in table
  with open(work / "predictions.csv") as f:
    preds = list(csv.DictReader(f))
  assert len(preds) == 80 and {p["run"] for p in preds} == {"MobileNet_V2-frozen", "MobileNet_V2-full"}
  for name in ("train", "val", "test"):
    assert len([x for x in (work / "splits" / f"{name}.txt").read_text().splitlines() if not x.startswith("#")]) \
        == {"train": 64, "val": 32, "test": 40}[name]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(work / "tb"))
  for name in ("scatter_MobileNet_V2-full.png", "gallery_worst_MobileNet_V2-full.png", "age_histograms.png",
               "report.md"):
    assert (work / "diagnostics" / name).exists(), name


def test_frozen_keeps_backbone_full_changes_it(imdb_run):
  work, rows, _ = imdb_run
  frozen, full = rows
  assert float(frozen["backbone_max_change"]) == 0.0 and float(full["backbone_max_change"]) > 0.0
  assert int(frozen["trainable_params"]) < int(full["trainable_params"])
  start = load_pretrained(str(work.parent / "prior"))[1]["params"]["backbone"]
  for run, same in (("MobileNet_V2-frozen", True), ("MobileNet_V2-full", False)):
    model, variables, _ = load_pretrained(str(work / "checkpoints" / run))
    equal = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), start,
                                         variables["params"]["backbone"]))
    assert all(equal) if same else not all(equal)
    ages = model.apply(variables, PRE(jnp.zeros((2, 32, 32, 3), jnp.uint8)))
    assert ages.shape == (2, 1) and bool(jnp.all(jnp.isfinite(ages)))


def test_rerun_skips_finished_runs(imdb_run, caplog):
  work, _, c = imdb_run
  before = (work / "results.csv").read_text()
  c.diagnostics = False
  with caplog.at_level("INFO"):
    run_config(c, str(work))
  assert (work / "results.csv").read_text() == before
  assert "already in results.csv" in caplog.text


def test_frozen_mode_keeps_batchnorm_statistics():
  """A BatchNorm backbone (EfficientNet-Lite, 7 blocks) frozen: parameters and running statistics stay, the head
  trains (full mode moving the backbone is covered by the study tests; its BatchNorm compile is slow on CPU)."""
  model = build_model(dict(arch="efficientnet_lite0", head="regression", regression_hidden=(8, 4),
                           backbone=dict(width=0.25, depth_mult=0.1, bn_train=False)))
  variables = random_variables(model, 16)
  params, stats = variables["params"], variables["batch_stats"]
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (24, 16, 16, 3), dtype=np.uint8))
  ages = jnp.asarray(np.linspace(5, 70, 24, dtype=np.float32))
  optimizer = fit_lib.optimizer_for(ml_collections.ConfigDict(dict(name="adam", base_lr=1e-2)), params, "frozen")
  state = init_state(variables, optimizer, 0)
  out = fit_lib.fit(model, "regression", PRE, optimizer, state, fit_lib.FitConfig(batch_size=8, crop=16, steps=2),
                    "frozen", images, ages, np.arange(24), progress=False)
  assert jax.tree.all(jax.tree.map(np.array_equal, params["backbone"], out.params["backbone"]))
  assert jax.tree.all(jax.tree.map(np.array_equal, stats, out.batch_stats))
  assert not np.array_equal(params["head"]["fc3"]["kernel"], out.params["head"]["fc3"]["kernel"])


def test_utkface_transfer_on_real_faces(utkface_root, tmp_path):
  """configs/utkface_transfer.py:runlocal on a 240-image subset of the real folder, a tiny prior for Lite0."""
  prior = tiny_prior(str(tmp_path / "prior"))
  c = _small(utkface_transfer.get_config(f"runlocal,lite0={prior},res=32,max_records=240"))
  c.data.root = utkface_root
  c.data.cache_dir = str(tmp_path / "cache")
  c.backbones[0]["backbone_overrides"] = {}
  c.epochs = 1
  rows = run_config(c, str(tmp_path / "w"))
  assert [r["mode"] for r in rows] == ["frozen", "full"]
  assert all(np.isfinite(float(r["test_mae"])) and float(r["test_mae"]) < 60 for r in rows)
  assert int(rows[0]["test_images"]) == 48 and int(rows[0]["val_images"]) == 48
  out = tmp_path / "w" / "diagnostics"
  assert (out / "gallery_worst_EfficientNet-Lite0-full.png").exists()  # galleries of the real face files
  report = (out / "report.md").read_text()
  assert re.search(r"exact: \d+ groups .* among 2[34]\d files", report)


def test_missing_paths_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"config\.backbones is empty"):
    run_config(imdb_transfer.get_config(""), str(tmp_path / "a"))
  prior = tmp_path / "prior"  # only checked to exist before the data loads
  prior.mkdir()
  with pytest.raises(ConfigError, match=r"config\.data\.root"):
    run_config(imdb_transfer.get_config(f"effb3={prior}"), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match=r"config\.backbones\[EfficientNet-Lite0\]\.dir"):
    run_config(utkface_transfer.get_config("runlocal"), str(tmp_path / "c"))
  c = imdb_transfer.get_config(f"effb3={tmp_path / 'nope'}")
  with pytest.raises(ConfigError, match="does not exist"):
    run_config(c, str(tmp_path / "d"))
