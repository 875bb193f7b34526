"""End to end: the demo config through the CLI, outputs, resume, predict, and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from agejax.configs import base_config, tiny_vgg
from agejax.errors import ConfigError, TrainingError
from agejax.main import run_config
from agejax.reports.tables import RESULT_FIELDS, read_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                        env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  r = _cli("-m", "agejax.main", "--config", "configs/demo.py:quick", "--workdir", str(workdir),
           "--config.progress=False")
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, r


def test_demo_writes_every_output(demo_run):
  workdir, _ = demo_run
  rows = read_results(workdir / "results.csv")
  header = open(workdir / "results.csv").readline().strip().split(",")
  assert header[:len(RESULT_FIELDS)] == list(RESULT_FIELDS)
  priors = {r["prior"] for r in rows}
  assert priors == {"scratch", "pretrained"}
  smallest = [r for r in rows if r["prior"] == "scratch" and r["n_train"] == 3]
  assert len(smallest) == 4 and len({r["seed"] for r in smallest}) == 4
  assert all(np.isfinite(r["mae"]) for r in rows)
  table = (workdir / "table.md").read_text()
  assert "| n_train | scratch | pretrained |" in table and "±" in table
  assert (workdir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  split = workdir / "splits" / "scratch" / "n00003" / "trial00.txt"
  lines = [x for x in split.read_text().splitlines() if not x.startswith("#")]
  assert len(lines) == 3
  assert json.loads((workdir / "config.json").read_text())["data"]["name"] == "synthetic"
  plan = json.loads((workdir / "conv_plan.json").read_text())["plan"]  # what a rerun here follows
  # VGG-16: 13 convolutions of 9 distinct shapes (conv3_2 = conv3_3, conv4_2 = conv4_3, conv5_1 = 5_2 = 5_3)
  assert len(plan) == 9 and set(plan.values()) <= {"lax", "canonical", "patches"}
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tb"))
  best = workdir / "checkpoints" / "scratch" / "n00003_best"
  assert (best / "agejax_prior.json").exists()
  # the pre-training stage wrote a prior directory that the learning curve used
  assert any(d.startswith("pretrained-") for d in os.listdir(workdir / "priors"))
  # both priors share one compiled engine (same architecture), yet each trains from its own weights
  untouched = {r["prior"]: r["mae"] for r in rows if r["n_train"] == 0}
  first = {p: [r["mae"] for r in rows if r["prior"] == p and r["n_train"] == 3] for p in priors}
  assert untouched["scratch"] != untouched["pretrained"] and first["scratch"] != first["pretrained"]


def test_rerun_resumes_without_new_rows(demo_run):
  workdir, _ = demo_run
  before = (workdir / "results.csv").read_text()
  r = _cli("-m", "agejax.main", "--config", "configs/demo.py:quick", "--workdir", str(workdir),
           "--config.progress=False")
  assert r.returncode == 0, r.stderr[-2000:]
  assert (workdir / "results.csv").read_text() == before
  # nothing is trained again, not even the pre-training stage
  assert "rerun skips the sizes already in results.csv (0, 3" in r.stderr and "to do: none" in r.stderr
  r = _cli("-m", "agejax.main", "--config", "configs/demo.py:quick", "--workdir", str(workdir),
           "--config.progress=False", "--config.seed=5")
  assert r.returncode != 0 and "holds results of another config: seed (0 -> 5)" in r.stderr
  assert (workdir / "results.csv").read_text() == before


def test_predict_cli_on_a_saved_trial(demo_run, tmp_path):
  from PIL import Image

  from agejax.data.synthetic import synthetic_dataset

  workdir, _ = demo_run
  images, _ = synthetic_dataset(2, 40, seed=9)
  paths = []
  for i, im in enumerate(images):
    paths.append(str(tmp_path / f"face{i}.png"))
    Image.fromarray(im).save(paths[-1])
  ckpt = workdir / "checkpoints" / "pretrained" / "n00003_median"
  r = _cli("-m", "agejax.predict", "--checkpoint", str(ckpt), "--aligned", *paths)  # synthetic chips, no faces
  assert r.returncode == 0, r.stderr[-2000:]
  # the demo trained on synthetic discs: its checkpoints say so and predict warns before any age
  assert json.loads((ckpt / "agejax_prior.json").read_text())["training_data"] == {"name": "synthetic",
                                                                                   "synthetic": True}
  assert "warning:" in r.stderr and "synthetic" in r.stderr
  header, *lines = r.stdout.strip().splitlines()
  out = [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]
  assert [o["path"] for o in out] == paths
  assert all(0 < float(o["age"]) < 150 for o in out)


def test_unknown_config_field_is_a_clear_error(tmp_path):
  r = _cli("-m", "agejax.main", "--config", "configs/demo.py", "--workdir", str(tmp_path),
           "--config.trials.no_such_field=3")
  assert r.returncode != 0
  assert "no_such_field" in r.stderr


def test_missing_dataset_path_names_the_field(tmp_path):
  from configs import utkface  # noqa: PLC0415

  cfg = utkface.get_config("runlocal")
  cfg.data.root = str(tmp_path / "nope")
  with pytest.raises(ConfigError, match=r"config\.data\.root"):
    run_config(cfg, str(tmp_path / "w"))


def test_nan_loss_stops_naming_trial_and_step(tmp_path):
  c = base_config()
  c.data.update(name="synthetic", resize=36, crop=32, pool_size=40, test_size=20)
  c.model.preprocess = dict(channel_order="RGB", scale=1.0)
  c.priors = [dict(name="boom", model=tiny_vgg(width=1 / 32, fc_dim=16), head="new")]
  c.sizes = [(4, 2, 100, 6)]
  c.optim.base_lr = 1e12
  c.trials.parallel = "vmap"
  c.progress = False
  with pytest.raises(TrainingError, match=r"prior 'boom', size 4, trial \d+ \(seed \d+\), step \d+"):
    run_config(c, str(tmp_path))


def test_utkface_config_on_real_faces(utkface_root, tmp_path):
  """A CI-sized run of configs/utkface.py on the real folder: split without leaks, rows per trial."""
  from configs import utkface  # noqa: PLC0415

  cfg = utkface.get_config("runlocal,res=32,max_size=6")
  cfg.data.root = utkface_root
  cfg.data.test_size = 60
  cfg.data.max_records = 1500  # a random subset keeps CI fast; the split still groups its duplicates
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.sizes = [(3, 8, 3, 10), (6, 2, 6, 10)]
  cfg.trials.parallel = "vmap"
  cfg.progress = False
  cfg.save_trials = "none"
  rows = run_config(cfg, str(tmp_path / "w"))
  assert {r["n_train"] for r in rows} == {0, 3, 6}
  assert len([r for r in rows if r["n_train"] == 3]) == 8
  info = json.loads((tmp_path / "w" / "data_info.json").read_text())
  assert info["test"] == 60 and "duplicate_groups" in info
  # no test image has a byte-identical copy in any trial's training list
  import hashlib  # noqa: PLC0415

  def names(path):
    return {line.split("\t")[0] for line in path.read_text().splitlines() if not line.startswith("#")}

  digest = lambda p: hashlib.sha1(open(p, "rb").read()).hexdigest()  # noqa: E731
  test = names(tmp_path / "w" / "splits" / "test.txt")
  train = set().union(*(names(f) for f in (tmp_path / "w" / "splits" / "scratch-vgg").rglob("*.txt")))
  assert len(test) == 60 and len(train) > 3
  assert not {digest(p) for p in test} & {digest(p) for p in train}
