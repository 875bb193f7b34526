"""Protocol fidelity (issue 17): the authors' size/trial/solver tables, their split lists, their statistics
(ddof 0) and a run beside their per-trial CSVs, and the two imposing targets ('pool', 'test')."""

import ast
import os
import re

import numpy as np
import pytest
from PIL import Image

from agejax import configs as C
from agejax.data import split_lists
from agejax.data.distribution import age_histogram, apportion
from agejax.data.records import AgeRecord
from agejax.errors import ConfigError, DatasetError
from agejax.experiments import pretrain
from agejax.reports import compare, tables
from configs import lap, lap_impose, morph, morph_impose

# The authors' MORPH 2 solver rows (issue 17; their per-trial solver prototxts): portion, images, trials,
# stepsize, max_iter.
AUTHORS_MORPH = [
    (0.000625, 3, 32, 2, 10), (0.00125, 6, 32, 3, 15), (0.0017, 9, 32, 4, 20), (0.0025, 13, 32, 7, 35),
    (0.00375, 20, 32, 10, 50), (0.005, 27, 32, 13, 65), (0.01, 54, 16, 25, 125), (0.02, 109, 8, 50, 250),
    (0.04, 219, 4, 100, 500), (0.08, 438, 2, 200, 1000), (0.16, 876, 1, 400, 2000), (0.2, 1095, 1, 500, 2500),
    (0.4, 2190, 1, 1000, 5000), (0.8, 4380, 1, 2000, 10000)]
AUTHORS_LAP_TRIALS = [32, 32, 32, 32, 16, 8, 4, 2, 1, 1, 1, 1]


def test_solver_tables_are_the_authors():
  assert [tuple(r) for r in C.MORPH_SOLVER] == AUTHORS_MORPH
  for paper, table in C.PAPER_SOLVERS.items():  # n = int(pool * p / 0.8), as prepare_files.py draws
    assert [C.portion_images(C.PAPER_POOLS[paper], r[0]) for r in table] == [r[1] for r in table]
  assert [r[2] for r in C.LAP_SOLVER] == AUTHORS_LAP_TRIALS
  portions = {r[0]: r[3:] for r in C.LAP_SOLVER}  # MORPH's solver is LAP's, keyed to the portion
  assert all(portions[p] == tuple(rest) for p, _, _, *rest in AUTHORS_MORPH if p in portions)
  m = morph.get_config("dex=/d")
  assert [tuple(s) for s in m.sizes] == [r[1:] for r in AUTHORS_MORPH]
  assert tuple(m.data.rotation_angles) == tuple(lap.get_config("dex=/d").data.rotation_angles) == C.PAPER_ROTATIONS
  assert len(C.PAPER_ROTATIONS) == 10 and m.data.split_lists == "" and m.data.test_size == 1095
  assert {n: C.authors_stage_solver(n)["steps"] for n in (0, 100, 1000, 10000)} == \
      {0: 250000, 100: 68, 1000: 678, 10000: 6783}
  assert [C.authors_stage_solver(n)["stepsize"] for n in (0, 100, 1000, 10000)] == [100000, 27, 271, 2713]
  assert C.authors_stage_solver(100)["batch_size"] == 15 and C.authors_stage_solver(100)["stop"] == "fixed"
  with pytest.raises(ConfigError, match="not 500"):
    C.authors_stage_solver(500)


def _doc(module) -> str:
  """A config's docstring with its whitespace folded (phrases may wrap)."""
  return " ".join(ast.get_docstring(ast.parse(open(module.__file__).read())).split())


def _stages(c):
  return {p["name"]: p["pretrain"] for p in c.priors if p.get("pretrain")}


def test_paper_configs_impose_as_the_authors_or_not():
  s = _stages(lap.get_config("dex=/d,imdb=/i,lists=/l"))
  matched = s["imdb-lap-matched"]
  assert matched["distribution"] == {"mode": "matched", "total": 0, "multiple": 4.0, "target": "test"}
  assert (matched["stop"], matched["steps"], matched["stepsize"], matched["batch_size"]) == \
      ("fixed", 250000, 100000, 15)
  assert matched["data"]["test_fraction"] == 0.2  # 80% of IMDB is the source pool
  assert "target" not in s["imdb-uniform"]["distribution"]
  own = _stages(lap.get_config("dex=/d,imdb=/i,target=pool,stop=converge"))["imdb-lap-matched"]
  assert own["stop"] == "converge" and "target" not in own["distribution"] and "steps" not in own
  for module, name in ((lap_impose, "lap"), (morph_impose, "morph")):
    sized = _stages(module.get_config("dex=/d,imdb=/i"))
    assert [(sized[f"{name}-matched-{k}"]["steps"], sized[f"{name}-matched-{k}"]["distribution"]["target"])
            for k in ("100", "1000", "10000", "all")] == [(68, "test"), (678, "test"), (6783, "test"), (250000, "test")]
    conv = _stages(module.get_config("dex=/d,imdb=/i,target=pool,stop=converge"))[f"{name}-matched-100"]
    assert conv["stop"] == "converge" and conv["val_size"] == 2000 and "target" not in conv["distribution"]
    doc = _doc(module)
    assert re.search("READS? TEST LABELS", doc) and f"--config configs/{name}_impose.py:dex=" in doc
  for module in (lap, morph):
    doc = _doc(module)
    assert re.search("READS? TEST LABELS", doc) and "python -m agejax.reports.compare" in doc and "lists=" in doc
  assert morph.get_config("lists=/authors/lists").data.split_lists == "/authors/lists"
  with pytest.raises(ValueError, match="target='labels'"):
    lap.get_config("target=labels")


def _rec(path, age, split=None):
  return AgeRecord(path=path, age=float(age), split=split)


# The first lines of the authors' chalearn_train_80 / chalearn_validation and 2_1_train / 2_1_test (facts).
LAP_POOL = ("/home/rrothe/git/chalearn/code/data/train/image_3178.jpg_face.jpg 37\n"
            "/home/rrothe/git/chalearn/code/data/train/image_2740.jpg_face.jpg 9\n\n")
LAP_TEST = "/home/rrothe/git/chalearn/code/data/val/image_3028.jpg_face.jpg 20\n"
MORPH_POOL = "/srv/x/morph/Album2/123542_1F33.JPG_face.jpg 33\n/srv/x/morph/Album2/217026_04F34.JPG_face.jpg 34\n"
MORPH_TEST = "/srv/x/morph/Album2/333314_02M49.JPG_face.jpg 49\n"


def _lists(tmp_path, name, pool, test, files=None):
  d = tmp_path / name
  d.mkdir()
  pool_name, test_name = files or split_lists.LIST_FILES[name]
  (d / pool_name).write_text(pool)
  (d / test_name).write_text(test)
  return str(d)


def test_split_lists_match_by_name_and_count_the_rest(tmp_path):
  recs = [_rec("/d/lap/train/image_3178.jpg_face.jpg", 37.4, "train"), _rec("/d/lap/valid/image_3028.jpg", 20.2),
          _rec("/d/lap/train/image_9.jpg", 40), _rec("/d/lap/train/image_2740.jpg_face.jpg", 9.0),
          _rec("/d/lap/test/image_3028.jpg", 61)]  # same name in another folder: the list's 'val' = 'valid'
  pool, test, info = split_lists.split_from_lists(recs, _lists(tmp_path, "lap", LAP_POOL, LAP_TEST), "lap")
  assert (pool, test) == ([0, 3], [1])  # list order
  assert info["unlisted_records"] == 2 and info["label_disagreements"] == 0
  morph_recs = [_rec("/m/Album2/333314_02M49.JPG", 49), _rec("/m/Album2/217026_04F34.JPG", 30),
                _rec("/m/Album2/123542_1F33.JPG", 33)]
  pool, test, info = split_lists.split_from_lists(morph_recs, _lists(tmp_path, "morph", MORPH_POOL, MORPH_TEST),
                                                  "morph")
  assert (pool, test, info["label_disagreements"]) == ([2, 1], [0], 1)  # 34 listed, 30 in the dataset
  assert info["label_disagreement_examples"][0][0].endswith("2_1_train.txt:2")


def test_split_lists_errors_name_the_file_and_line(tmp_path):
  recs = [_rec("/m/Album2/123542_1F33.JPG", 33), _rec("/m/Album2/333314_02M49.JPG", 49)]
  d = _lists(tmp_path, "morph", MORPH_POOL, MORPH_TEST)
  with pytest.raises(DatasetError, match=r"2_1_train\.txt:2: .*217026_04F34\.JPG_face\.jpg is not among the 2"):
    split_lists.split_from_lists(recs, d, "morph")
  bad = [("a.jpg 3\nb.jpg\n", r"pool\.txt:2: expected 'PATH LABEL'"), ("a.jpg 3\nx/a.jpg_face.jpg 4\n", "listed twice"),
         ("x/image_1.jpg_aug_7_face.jpg 3\n", "augmented copy")]
  for i, (text, match) in enumerate(bad):
    with pytest.raises(DatasetError, match=match):
      split_lists.split_from_lists([_rec("/g/a.jpg", 3)], _lists(tmp_path, f"g{i}", text, "t.jpg 1\n",
                                                                 split_lists.GENERIC_FILES), "generic")
  with pytest.raises(DatasetError, match="in both"):
    split_lists.split_from_lists([_rec("/g/a.jpg", 3)], _lists(tmp_path, "both", "a.jpg 3\n", "a.jpg 3\n",
                                                               split_lists.GENERIC_FILES), "generic")
  with pytest.raises(ConfigError, match="expected 2_1_train.txt and 2_1_test.txt"):
    split_lists.split_from_lists(recs, str(tmp_path), "morph")


def test_study_data_takes_the_lists(tmp_path):
  """config.data.split_lists through load_study_data on a generic CSV dataset of tiny images."""
  from agejax.configs import data_section
  from agejax.experiments.study_data import load_study_data

  root = tmp_path / "data"
  (root / "train").mkdir(parents=True)
  rows = ["path,age"]
  for i in range(6):
    Image.new("RGB", (12, 12), (40 * i, 10, 200)).save(root / "train" / f"f{i}.jpg")
    rows.append(f"train/f{i}.jpg,{20 + i}")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  d = _lists(tmp_path, "generic", "/authors/train/f4.jpg_face.jpg 24\n/authors/train/f1.jpg_face.jpg 21\n",
             "/authors/train/f0.jpg 20\n", split_lists.GENERIC_FILES)
  cfg = data_section(name="generic", root=str(root), resize=8, cache_dir="none", policy="skip", split_lists=d)
  data = load_study_data(cfg, seed=0)
  assert [os.path.basename(p) for p in data.pool_names] == ["f4.jpg", "f1.jpg"]
  assert [os.path.basename(p) for p in data.test_names] == ["f0.jpg"] and data.info["unlisted_records"] == 3
  seeded = load_study_data({**cfg.to_dict(), "split_lists": "", "test_size": 2}, seed=0)  # the default: a seeded split
  assert len(seeded.test_names) == 2 and len(seeded.pool_names) == 4


def _trial_rows(maes_by_size, prior="dex"):
  return [{"prior": prior, "n_train": n, "trial": t, "seed": t, "mae": m}
          for n, maes in maes_by_size.items() for t, m in enumerate(maes)]


def test_table_md_reports_the_population_sd(tmp_path):
  maes = [4.0, 5.0, 7.0]
  rows = _trial_rows({0: [5.5], 3: maes})
  text = tables.write_tables(tmp_path, rows, title="t").read_text()
  assert "ddof 0" in text.splitlines()[2]
  assert f"| 3 | {np.mean(maes):.3f} ± {np.std(maes):.3f} | 3 |" in text  # np.std: ddof 0
  assert f"{np.std(maes, ddof=1):.3f}" not in text
  tables.append_results(tmp_path / "results.csv", rows)
  assert [r["mae"] for r in tables.read_results(tmp_path / "results.csv")] == [5.5, *maes]  # every trial kept


# A few rows of the authors' MORPH 2 CSVs (Learning_curve_results/IMDB-Wiki.csv and Part_2's IMDB-Wiki_small.csv),
# and the row quoted in issue 17 (LAP's IMDB_LAP_Matched.csv, without the .caffemodel suffix).
AUTHORS_DEX = ("Fine_tune_0.00_0_iter_000.caffemodel,4.7078628316\n"
               "Fine_tune_0.00125_0_iter_15.caffemodel,3.7670896895\n"
               "Fine_tune_0.00125_1_iter_15.caffemodel,3.7986614547\n"
               "Fine_tune_0.00125_10_iter_15.caffemodel,4.0556870019\n")
AUTHORS_DEX_SMALL = ("Fine_tune_0.000625_4_iter_10.caffemodel,4.75158514008\n"
                     "Fine_tune_0.000625_2_iter_10.caffemodel,4.04338349108\n"
                     "Fine_tune_0.00125_10_iter_15.caffemodel,4.1\n")  # given again: replaces the earlier value
AUTHORS_VGGFACE = "VGG_FACE.caffemodel,16.2064423612\nFine_tune_0.00125_0_iter_15.caffemodel,9.5\n"


def test_compare_prints_the_authors_beside_the_run(tmp_path, capsys):
  authors = tmp_path / "authors"
  authors.mkdir()
  (authors / "IMDB-Wiki.csv").write_text(AUTHORS_DEX)
  (authors / "IMDB-Wiki_small.csv").write_text(AUTHORS_DEX_SMALL)
  (authors / "FaceNet.csv").write_text(AUTHORS_VGGFACE)
  work = tmp_path / "w"
  tables.append_results(work / "results.csv", _trial_rows({0: [4.9], 6: [3.5, 3.9]}))
  assert compare.main(["--paper", "morph", "--workdir", str(work), "--authors", str(authors)]) == 0
  out = capsys.readouterr().out
  six = [3.7670896895, 3.7986614547, 4.1]
  assert f"| dex | 6 | {np.mean(six):.3f} ± {np.std(six):.3f} | 3 | 3.700 ± 0.200 | 2 | {3.7 - np.mean(six):+.3f} |" \
      in out
  three = [4.75158514008, 4.04338349108]
  assert f"| dex | 3 | {np.mean(three):.3f} ± {np.std(three):.3f} | 2 |  |  |  |" in out
  assert "| dex | 0 | 4.708 ± - | 1 | 4.900 ± - | 1 | +0.192 |" in out
  assert "| vggface | 0 | 16.206 ± - | 1 |" in out and "| vggface | 6 | 9.500 ± - | 1 |" in out
  assert "1 authors' trials were given again" in out
  # LAP maps portions to LAP sizes: 0.005 of 1981 is 12 images (the row, no .caffemodel suffix).
  (authors / "x.csv").write_text("Fine_tune_0.005_22_iter_65,4.5945\n")
  res = compare.read_authors([str(authors / "x.csv")], "lap", {"x": "dex"})
  assert res.values("dex", 12) == [4.5945] and res.notes == []
  with pytest.raises(ConfigError, match=r"no prior is known for the file name 'x'"):
    compare.read_authors([str(authors / "x.csv")], "lap")
  (authors / "IMDB_Wiki.csv").write_text("Fine_tune_0.005_22_iter_65,4.5945\nmodel 0.005,4.1\n")
  assert compare.main(["--paper", "lap", "--workdir", str(work), "--authors", str(authors / "IMDB_Wiki.csv")]) == 2
  assert "IMDB_Wiki.csv:2: not a per-trial result row" in capsys.readouterr().err


def test_impose_target_test_imposes_the_test_histogram():
  """'test' (the authors'): the resampled histogram is the test set's apportionment, eq. 3; 'pool' the pool's."""
  rng = np.random.default_rng(0)
  source = rng.integers(18, 70, 250).astype(float)
  pool = rng.integers(18, 30, 400).astype(float)
  test = np.concatenate([rng.integers(40, 60, 90), np.full(10, 25)]).astype(float)
  assert set(age_histogram(test).nonzero()[0]) <= set(age_histogram(source).nonzero()[0])
  c = lap_impose.get_config("dex=/d,imdb=/i")
  entry = next(p for p in c.priors if p["name"] == "lap-matched-all")
  ages = pretrain.impose_target_ages(entry, c, pool, test)
  assert ages is test
  idx = pretrain.draw_training_set(source, entry["pretrain"]["distribution"], ages, seed=3)
  # eq. 3: n(age) = n_test(age) * 4 N / N_test = 10 n_test(age) here (N = 250 source, 100 test images).
  assert np.array_equal(age_histogram(source[idx]), age_histogram(test) * 4 * 250 // 100)
  c_pool = lap_impose.get_config("dex=/d,imdb=/i,target=pool")
  e_pool = next(p for p in c_pool.priors if p["name"] == "lap-matched-100")
  assert pretrain.impose_target_ages(e_pool, c_pool, pool, test) is pool
  idx = pretrain.draw_training_set(source, e_pool["pretrain"]["distribution"], pool, seed=3)
  weights = np.where(age_histogram(source) > 0, age_histogram(pool), 0)
  assert np.array_equal(age_histogram(source[idx]), apportion(weights, 100, np.random.default_rng(3)))
  assert pretrain.stage_key(entry, c, test) != pretrain.stage_key(entry, c, pool)  # the target is in the hash


def test_impose_target_errors():
  c = lap_impose.get_config("dex=/d,imdb=/i,target=pool")
  entries = [p for p in c.priors if p.get("pretrain")]
  entries[1]["pretrain"] = {**entries[1]["pretrain"], "init_from": entries[0]["name"],
                            "distribution": {"mode": "matched", "total": 5, "target": "test"}}
  with pytest.raises(ConfigError, match="impose different targets"):
    pretrain.impose_target(entries[1], c)
  entries[2]["pretrain"] = {**entries[2]["pretrain"], "distribution": {"mode": "matched", "target": "val"}}
  with pytest.raises(ConfigError, match=r"priors\[lap-matched-10000\]\.pretrain\.distribution\.target"):
    pretrain.impose_target(entries[2], c)
  assert pretrain.impose_target({"name": "dex", "dir": "/d"}, c) == "pool"
