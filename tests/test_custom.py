"""configs/custom.py: the UTKFace study on a user's own `path,age[,split,subject]` CSV, and its one-line errors."""

import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A second or two of training (with `res=32`): one size, two trials, two steps, no tuning or checkpoints.
QUICK = ("--config.sizes=((3, 2, 1, 2),)", "--config.data.cache_dir=none", "--config.trials.parallel=loop",
         "--config.trials.conv_impl=lax", "--config.checkpoint.enabled=False", "--config.min_steps=2",
         "--config.eval_size_zero=False", "--config.diagnostics=False", "--config.progress=False")


def _face(age: float, seed: int) -> Image.Image:
  """A 32 px face-like drawing: skin darkens and the mouth thickens with age."""
  rng = np.random.default_rng(seed)
  im = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(60, 200, 3)))
  d = ImageDraw.Draw(im)
  d.ellipse((6, 4, 26, 28), fill=(200 - int(age), 160 - int(age) // 2, 130))
  for x in (11, 18):
    d.ellipse((x, 12, x + 3, 15), fill=(30, 30, 30))
  d.line((12, 22, 20, 22), fill=(120, 40, 40), width=1 + int(age) // 30)
  return im


def write_faces(folder, n: int = 40, split: bool = False) -> str:
  """n face images under folder/faces with ages 5..64, subjects of 4 images each; returns the CSV path."""
  os.makedirs(folder / "faces", exist_ok=True)
  rows = []
  for i in range(n):
    _face(5 + 1.5 * i, i).save(folder / "faces" / f"{i:02d}.png")
    rows.append({"path": f"faces/{i:02d}.png", "age": f"{5 + 1.5 * i:g}", "subject": f"p{i // 4}",
                 "split": "test" if i % 5 == 0 else "train"})
  path = folder / "labels.csv"
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, ["path", "age", "subject"] + (["split"] if split else []), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  return str(path)


def _main(workdir, arg: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "agejax.main", "--config", f"configs/custom.py:{arg}",
                         "--workdir", str(workdir), *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": REPO})


def test_runs_a_study_on_a_csv(tmp_path):
  labels = write_faces(tmp_path)
  proc = _main(tmp_path / "w", f"csv={labels},runlocal,res=32", *QUICK)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "w" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 and {r["n_train"] for r in rows} == {"3"}
  assert all(np.isfinite(float(r["mae"])) for r in rows)
  with open(tmp_path / "w" / "splits" / "test.txt") as f:
    test = [ln.split("\t")[0] for ln in f if not ln.startswith("#")]
  assert len(test) == 8 and all(p.startswith(str(tmp_path / "faces")) for p in test)  # relative to the CSV


def test_config_keeps_the_utkface_study(tmp_path):
  from configs import custom, utkface

  labels = write_faces(tmp_path, n=12)
  c, u = custom.get_config(f"csv={labels},runlocal,scratch=False,wrn=/p/wrn"), utkface.get_config(
      "runlocal,scratch=False,wrn=/p/wrn")
  assert [p.to_dict() if hasattr(p, "to_dict") else p for p in c.priors] == [
      p.to_dict() if hasattr(p, "to_dict") else p for p in u.priors]
  assert c.optim == u.optim and c.data.resize == u.data.resize and c.data.pad_fraction == u.data.pad_fraction
  assert c.data.name == "generic" and c.data.root == labels and c.data.test_size == 2  # 20% of 12 rows
  assert [tuple(s) for s in c.sizes] == [tuple(s) for s in u.sizes if s[0] <= 10]  # none above the pool of 10
  assert len(c.sizes) < len(u.sizes)
  assert c.model.init_age == pytest.approx(np.mean([5 + 1.5 * i for i in range(12)]), abs=0.06)


def _load(labels: str, **fields):
  from agejax.configs import data_section
  from agejax.experiments.study_data import load_study_data

  cfg = data_section(**dict(name="generic", root=labels, resize=8, cache_dir="none", policy="skip", test_size=8,
                            dedupe=True, split_column=True, reader_options=dict(strict_ages=True)) | fields)
  return load_study_data(cfg, seed=0)


def _subject(path: str) -> int:
  return int(os.path.basename(path)[:2]) // 4


def test_split_column_and_subject_disjoint_split(tmp_path):
  own = _load(write_faces(tmp_path / "own", split=True))
  assert sorted(int(os.path.basename(p)[:2]) for p in own.test_names) == list(range(0, 40, 5))
  assert own.info["split"] == "the CSV's split column" and len(own.pool_names) == 32
  drawn = _load(write_faces(tmp_path / "drawn"))
  assert len(drawn.test_names) == 8 and drawn.info["subject_disjoint"]
  assert not {_subject(p) for p in drawn.test_names} & {_subject(p) for p in drawn.pool_names}
  with open(tmp_path / "own" / "labels.csv", "a") as f:
    f.write("faces/00.png,30,p0,valid\n")
  from agejax.errors import DatasetError

  with pytest.raises(DatasetError, match=r"labels.csv:42 \('valid'\)"):
    _load(str(tmp_path / "own" / "labels.csv"))


# -- one-line errors: every case runs at once, each test checks its own -------------------------------------------
ERRORS = {
    "no_csv": ("runlocal", "configs/custom.py needs csv=PATH"),
    "missing_csv": ("csv={d}/nope.csv", "csv='{d}/nope.csv' does not exist"),
    "missing_column": ("csv={d}/cols.csv", "missing 'path' (columns found: file, age, subject)"),
    "age_not_a_number": ("csv={d}/age.csv", "age.csv:3: age 'forty' is not a number"),
    "no_image": ("csv={d}/none.csv", "no image found: all 5 listed paths are missing"),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("errors")
  write_faces(d, n=2)
  (d / "cols.csv").write_text("file,age,subject\nfaces/00.png,5,p0\n")
  (d / "age.csv").write_text("path,age\nfaces/00.png,5\nfaces/01.png,forty\n")
  (d / "none.csv").write_text("path,age\n" + "".join(f"gone/{i}.png,{20 + i}\n" for i in range(5)))
  with ThreadPoolExecutor(len(ERRORS)) as pool:
    runs = pool.map(lambda arg: _main(d / "w", arg.format(d=d)), [a for a, _ in ERRORS.values()])
    return d, dict(zip(ERRORS, runs, strict=True))


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_is_one_line(error_runs, case):
  d, runs = error_runs
  proc, expect = runs[case], ERRORS[case][1].format(d=d)
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1 and expect in lines[0], proc.stderr
  if case == "no_image":
    assert "gone/0.png, gone/1.png, gone/2.png, ..." in lines[0] and "gone/3.png" not in lines[0]
