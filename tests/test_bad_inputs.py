"""Bad inputs a new user meets: each is a one-line error or a rejection that names the file, field or flag.

A UTKFace-style folder with truncated, empty and random-bytes JPEGs among good ones; bad command lines and
configs of `python -m agejax.main`; bad paths given to the data and report tools; a repository that refers to
nothing outside itself. (Other areas append their cases at the end of this file.)
"""

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import ml_collections
import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD, TRUNCATED, EMPTY, RANDOM = 30, 3, 8, 3  # distinct good images, then the three kinds of corrupt file


def _name(i: int) -> str:
  return f"{20 + i % 50}_{i % 2}_{i % 5}_2017010402{i:07d}.jpg.chip.jpg"


def _jpeg(seed: int) -> bytes:
  noise = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noise).save(buf, "JPEG", quality=95)
  return buf.getvalue()


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> tuple[str, list[str], str]:
  """(root, corrupt files, the copy of good image 0): 30 distinct good faces, one byte-identical copy, 14 corrupt."""
  root = tmp_path_factory.mktemp("utk_bad")
  for i in range(GOOD):
    (root / _name(i)).write_bytes(_jpeg(i))
  copy = root / _name(GOOD)
  shutil.copy(root / _name(0), copy)
  corrupt = []
  for k in range(TRUNCATED + EMPTY + RANDOM):
    path = root / _name(GOOD + 1 + k)
    if k < TRUNCATED:
      whole = _jpeg(100 + k)
      data = whole[: len(whole) * 3 // 4]  # cut inside the scan data: distinct bytes, no end of image
    elif k < TRUNCATED + EMPTY:
      data = b""
    else:
      data = np.random.default_rng(200 + k).integers(0, 256, 400, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    corrupt.append(str(path))
  return str(root), sorted(corrupt), str(copy)


def _utk_cfg(root: str, **fields) -> dict:
  from agejax.configs import data_section

  return data_section(**{"name": "utkface", "root": root, "resize": 16, "crop": 16, "policy": "skip",
                         "cache_dir": "none", "test_size": 10, "dedupe": True, **fields}).to_dict()


# -- item 2: every rejected input named, before the split -------------------------------------------------
def test_corrupt_files_are_rejected_by_name_before_the_split(bad_folder, caplog):
  from agejax.experiments.study_data import load_study_data

  root, corrupt, _ = bad_folder
  with caplog.at_level(logging.INFO, logger="agejax.experiments.study_data"):
    data = load_study_data(_utk_cfg(root), seed=0)
  assert len(data.test_names) == 10, "the requested test size holds: corrupt files were dropped before the split"
  assert data.num_bases == GOOD - 10  # the copy of image 0 is grouped with it, so one of the pair is left out
  rejected = data.rejections.to_dict()["by_reason"]
  assert sorted(rejected["corrupt image"]["files"]) == corrupt  # all 14 named, empty files included
  assert not set(corrupt) & set(data.test_names + data.pool_names)
  assert data.info["duplicate_groups"] == 1 and data.info["duplicate_copies"] == 1  # empty files are no copies
  assert data.info["rejected"] == {"corrupt image": len(corrupt)}
  text = caplog.text
  assert f"{len(corrupt)} inputs rejected" in text and f"{len(corrupt)} corrupt image: " in text
  assert os.path.basename(corrupt[0]) in text and "data_report.json" in text


def test_a_partial_pool_is_validated_in_full_and_decoded_alike(bad_folder):
  """pool_limit keeps part of the pool: every file is still checked first, the kept ones decode as without it."""
  from agejax.experiments.study_data import load_study_data

  root, corrupt, _ = bad_folder
  full = load_study_data(_utk_cfg(root), seed=0)
  part = load_study_data(_utk_cfg(root, pool_limit=5), seed=0)
  assert sorted(part.rejections.examples["corrupt image"]) == corrupt
  assert part.test_names == full.test_names and len(part.pool_names) == 5
  kept = [full.pool_names.index(name) for name in part.pool_names]
  assert kept != list(range(5)), "a seeded random part of the pool, not its first files (file order = age order)"
  assert part.pool_names == load_study_data(_utk_cfg(root, pool_limit=5), seed=0).pool_names  # seeded
  np.testing.assert_array_equal(part.test_images, full.test_images)
  np.testing.assert_array_equal(part.pool_images, full.pool_images[kept])


def test_data_report_lists_every_rejected_file(bad_folder, tmp_path):
  from agejax.data.cache import load_images
  from agejax.data.readers import load_dataset

  root, corrupt, _ = bad_folder
  ds = load_dataset("utkface", root, policy="skip")
  load_images([r.path for r in ds.records], 8, None, rejections=ds.rejections, progress=False)
  ds.rejections.write(str(tmp_path / "data_report.json"))
  report = json.loads((tmp_path / "data_report.json").read_text())
  assert report["rejected"] == len(corrupt) and sorted(report["by_reason"]["corrupt image"]["files"]) == corrupt


def test_a_test_size_that_cannot_be_met_is_said(bad_folder, caplog):
  from agejax.experiments.study_data import load_study_data

  root, _, _ = bad_folder
  with caplog.at_level(logging.WARNING, logger="agejax.experiments.study_data"):
    data = load_study_data(_utk_cfg(root, test_size=40), seed=0)
  assert len(data.test_names) == GOOD - 1 and data.num_bases == 1
  assert data.info["test_size_requested"] == 40
  assert "requested 40 test images" in data.info["test_size_shortfall"]
  assert "requested 40 test images" in caplog.text


def test_empty_files_are_not_exact_duplicates(bad_folder):
  from agejax.data.duplicates import exact_duplicate_groups

  root, _, copy = bad_folder
  paths = sorted(os.path.join(root, f) for f in os.listdir(root))
  assert exact_duplicate_groups(paths) == [sorted([os.path.join(root, _name(0)), copy])]


def test_near_duplicates_name_an_undecodable_file(bad_folder):
  from agejax.data.duplicates import near_duplicate_groups
  from agejax.data.records import Rejections
  from agejax.errors import DatasetError

  root, corrupt, _ = bad_folder
  good = [os.path.join(root, _name(i)) for i in range(3)]
  with pytest.raises(DatasetError, match=re.escape(os.path.basename(corrupt[0]))):
    near_duplicate_groups(good + corrupt[:1])
  rej = Rejections("skip")
  assert near_duplicate_groups(good + corrupt, rejections=rej) == []
  assert sorted(rej.examples["corrupt image"]) == corrupt


def test_summarize_decodes_and_near_never_crashes(bad_folder, capsys):
  from agejax.data.__main__ import main

  root, corrupt, _ = bad_folder
  assert main(["summarize", "--format", "utkface", "--root", root, "--json", "--near", "--progress"]) == 0
  out, err = capsys.readouterr()
  s = json.loads(out)
  assert s["records"] == GOOD + 1  # the corrupt files are not records
  assert sorted(s["rejections"]["by_reason"]["corrupt image"]["files"]) == corrupt
  assert s["duplicates"]["exact"]["groups"] == 1 and s["duplicates"]["near"]["groups"] == 1
  assert "decoding images" in err  # the progress bar


# -- item 3: one-line errors for the command line and the config ------------------------------------------
def _main(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "agejax.main", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "PYTHONPATH": REPO})


def _one_line(proc: subprocess.CompletedProcess) -> str:
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  return lines[0]


def test_main_command_line_errors_are_one_line_and_write_nothing(tmp_path):
  work = tmp_path / "w"
  demo = ["--config", "configs/demo.py:quick,tiny", "--workdir", str(work)]
  cases = {
      "did_you_mean": (*demo, "--config.trials.paralel=vmap"),
      "missing_file": ("--config", "configs/nope.py", "--workdir", str(work)),
      "bad_arg": ("--config", "configs/demo.py:quikc", "--workdir", str(work)),
      "strategy": (*demo, "--config.trials.parallel=banana"),
      "debug": (*demo, "--config.trials.nope=1", "--debug"),
      "help": ("--help",),
  }
  # Validation must not start a JAX backend: the CPU device count is set after it (agejax.main.initialize).
  probe = ("from configs import demo; from agejax.validate import validate_config; "
           "validate_config(demo.get_config('quick,tiny')); from jax._src import xla_bridge; "
           "print('backends', xla_bridge.backends_are_initialized())")
  with ThreadPoolExecutor(4) as pool:
    backend = pool.submit(subprocess.run, [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    runs = dict(zip(cases, pool.map(lambda args: _main(*args), cases.values()), strict=True))
  assert backend.result().stdout.strip() == "backends False", backend.result().stderr
  assert "config.trials has no field 'paralel' (did you mean 'parallel'?)" in _one_line(runs["did_you_mean"])
  assert "config file 'configs/nope.py' does not exist" in _one_line(runs["missing_file"])
  assert "unknown config argument 'quikc'" in _one_line(runs["bad_arg"])
  assert "config.trials.parallel='banana'" in _one_line(runs["strategy"])
  assert runs["debug"].returncode != 0 and "Traceback" in runs["debug"].stderr
  assert runs["help"].returncode == 0 and "--workdir" in runs["help"].stdout, runs["help"].stderr
  assert not work.exists()  # validated before anything was written


def test_unknown_field_without_a_close_name_lists_the_fields():
  from agejax.main import _unknown_field

  line = _unknown_field("configs/demo.py:quick,tiny", ["seed", "trials.nope"])
  assert line.startswith("--config.trials.nope: config.trials has no field 'nope' (its fields: ")
  assert "chunk_steps" in line and "parallel" in line
  assert "config.seed is a value of type int" in _unknown_field("configs/demo.py", ["seed.x"])


def _demo_config() -> ml_collections.ConfigDict:
  from configs import demo

  return demo.get_config("quick,tiny")


@pytest.mark.parametrize("field, value, expect", [
    ("trials.conv_impl", "fast", "config.trials.conv_impl='fast'"),
    ("trials.compute_dtype", "fp8", "config.trials.compute_dtype='fp8'"),
    ("trials.auto_candidates", ("vmap", "nope"), "config.trials.auto_candidates[1]='nope'"),
    ("trials.chunk_steps", 0, "config.trials.chunk_steps=0"),
    ("optim.name", "sgd", "unknown optim.name 'sgd'"),
    ("model.head", "dexx", "config.model.head='dexx'"),
    ("data.name", "utk", "config.data.name='utk'"),
    ("data.policy", "lenient", "config.data.policy='lenient'"),
    ("data.crop", 64, "config.data.crop=64 is larger than config.data.resize"),
    ("sizes", ("banana",), "config.sizes[0]='banana' is not one of the (n, trials, stepsize, max_iter) rows"),
    ("sizes", ((3, 4, 4),), "config.sizes[0]=(3, 4, 4)"),
    ("sizes", ((3, 0, 4, 6),), "config.sizes[0] trials=0"),
    ("sizes", ((3, 4, "x", 6),), "config.sizes[0] stepsize='x'"),
    ("sizes", (), "config.sizes=() with config.eval_size_zero=False: nothing to run"),
    ("study", "curve", "config.study='curve'"),
    ("mesh.data", 0, "config.mesh.data=0"),
])
def test_validate_config_names_the_field(field, value, expect):
  from agejax.errors import ConfigError
  from agejax.validate import validate_config

  c = _demo_config()
  node, key = c, field
  if "." in field:
    section, key = field.split(".")
    node = c[section]
  with c.ignore_type():
    node[key] = value
  if field == "sizes" and not value:  # no sizes is fine with size 0 (the untouched priors), else an error
    c.eval_size_zero = True
    validate_config(c)
    c.eval_size_zero = False
  with pytest.raises(ConfigError) as e:
    validate_config(c)
  assert expect in str(e.value) and "\n" not in str(e.value)


def test_validate_config_checks_priors_and_data_paths(tmp_path):
  from agejax.errors import ConfigError
  from agejax.validate import validate_config

  validate_config(_demo_config())  # the demo itself is valid
  c = _demo_config()
  c.priors = [dict(name="ported", dir=str(tmp_path / "nope"), head="new")]
  with pytest.raises(ConfigError, match=r"config\.priors\[ported\]\.dir=.*does not exist"):
    validate_config(c)
  c.priors = [dict(c.priors[0], dir=""), ]
  with pytest.raises(ConfigError, match=r"config\.priors\[ported\] needs `dir`"):
    validate_config(c)
  c = _demo_config()
  c.priors = [dict(p) for p in c.priors] * 2
  with pytest.raises(ConfigError, match="used by two priors"):
    validate_config(c)
  c = _demo_config()
  c.priors[0]["model"]["arch"] = "vgg17"
  with pytest.raises(ConfigError, match=r"config\.priors\[scratch\]\.model\.arch='vgg17'"):
    validate_config(c)
  c = _demo_config()
  c.data.update(name="utkface", root=str(tmp_path / "missing"))
  with pytest.raises(ConfigError, match=r"config\.data\.root=.*does not exist"):
    validate_config(c)


def test_tools_give_one_line_errors_for_bad_paths(tmp_path, capsys):
  from agejax.data.bench_cache import main as bench_cache
  from agejax.reports.diagnostics import main as diagnostics

  assert bench_cache(["--root", str(tmp_path / "nope")]) == 2
  assert "nope: not a folder" in capsys.readouterr().err
  (tmp_path / "splits").mkdir()
  (tmp_path / "splits" / "test.txt").write_text("# header\na.jpg\t30\nb.jpg thirty\n")
  assert diagnostics(["--workdir", str(tmp_path), "--no-tensorboard", "--no-near"]) == 1
  err = capsys.readouterr().err.strip()
  assert "test.txt:3: expected `path<TAB>age`" in err and len(err.splitlines()) == 1


# -- item 5: a self-contained repository ------------------------------------------------------------------
_OUTSIDE = re.compile("|".join([r"PROTOCOL\.md", r"NOTES\.md", r"FORMATS\.md", r"STYLE\.md", r"\.\./" + "shared",
                                "/work/" + "shared"]))
_TEXT = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ".sbatch", ".yaml", ".yml", ".json", ""}  # "": scripts
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}


def test_no_reference_to_files_outside_the_repo():
  """No file cites the background notes or the folder beside the repo (the default data path is built with
  os.path.join in agejax.configs.SHARED_DATA and tests/conftest.py)."""
  hits = []
  for dirpath, dirnames, filenames in os.walk(REPO):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".venv")]
    for f in filenames:
      path = os.path.join(dirpath, f)
      if os.path.splitext(f)[1] not in _TEXT or os.path.getsize(path) > 2_000_000:
        continue
      with open(path, errors="replace") as fh:
        for number, line in enumerate(fh, 1):
          if _OUTSIDE.search(line):
            hits.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()[:100]}")
  assert not hits, "\n".join(hits)


def test_gitignore_covers_what_the_readme_writes():
  with open(os.path.join(REPO, ".gitignore")) as f:
    patterns = {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
  for folder in ("priors", "runs", "logs", "__pycache__", ".venv"):
    assert patterns & {f"{folder}/", f"/{folder}/", f"{folder}*/"}, folder
