"""Readers on small files built in each dataset's real on-disk format."""

import datetime
import math
import os

import numpy as np
import pytest
from scipy.io import loadmat, savemat

from agejax.data.readers import WARNING, formats, load_dataset
from agejax.data.readers.agedb import parse_name as agedb_name
from agejax.data.readers.imdb_wiki import age_from_dob
from agejax.errors import DatasetError


def touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\xff\xd8\xff" + os.path.basename(path).encode())
  return path


def datenum(y, m, d):
  return float(datetime.date(y, m, d).toordinal() + 366)


def cell(strings):
  c = np.empty((1, len(strings)), dtype=object)
  for i, s in enumerate(strings):
    c[0, i] = np.array([s]) if s else np.zeros((0, 0))
  return c


# (full_path, dob, photo_taken, gender, face_score, second_face_score, expected reason or age)
IMDB_ROWS = [
  ("17/10000217_1981-05-05_2009.jpg", datenum(1981, 5, 5), 2009, 1.0, 3.2, np.nan, 28),
  ("01/nm0000001_1990-08-20_2010.jpg", datenum(1990, 8, 20), 2010, 0.0, 1.5, np.nan, 19),
  ("02/noface.jpg", datenum(1980, 1, 1), 2000, 1.0, -np.inf, np.nan, "no face found (face_score -inf)"),
  ("02/weak.jpg", datenum(1980, 1, 1), 2000, 1.0, 0.5, np.nan, "face_score below 1"),
  ("02/two.jpg", datenum(1980, 1, 1), 2000, 1.0, 2.0, 1.7, "second face present"),
  ("02/nogender.jpg", datenum(1980, 1, 1), 2000, np.nan, 2.0, np.nan, "unknown gender"),
  ("02/bogus.jpg", 1e12, 2000, 1.0, 2.0, np.nan, "bogus dob or photo_taken"),
  ("02/old.jpg", datenum(1800, 1, 1), 2000, 1.0, 2.0, np.nan, "age outside [0, 100]"),
  ("02/missing.jpg", datenum(1980, 1, 1), 2000, 1.0, 2.0, np.nan, "missing file"),
]


def make_imdb(tmp_path, key="imdb"):
  root = tmp_path / f"{key}_crop"
  n = len(IMDB_ROWS)
  col = lambda j, dtype=np.float64: np.array([[r[j] for r in IMDB_ROWS]], dtype=dtype)
  struct = {"dob": col(1), "photo_taken": col(2, np.uint16), "full_path": cell([r[0] for r in IMDB_ROWS]),
            "gender": col(3), "name": cell(["A Person", ""] + ["X"] * (n - 2)),
            "face_location": np.empty((1, n), dtype=object),
            "face_score": col(4), "second_face_score": col(5), "celeb_names": cell(["A Person"]),
            "celeb_id": np.array([[100 + i for i in range(n)]], dtype=np.uint16)}
  for i in range(n):
    struct["face_location"][0, i] = np.array([[10.5, 20.0, 110.0, 120.0]])
  os.makedirs(root)
  savemat(root / f"{key}.mat", {key: struct})
  for r in IMDB_ROWS:
    if "missing" not in r[0]:
      touch(str(root / r[0]))
  return root


def test_registry_lists_every_format():
  for name in ("utkface", "imdb_wiki", "lap", "appa_real", "morph", "fgnet", "agedb", "csv"):
    assert name in formats()
  with pytest.raises(ValueError, match="unknown dataset format"):
    load_dataset("nope", ".")


def test_age_rule_1_july():
  assert age_from_dob(datenum(1981, 5, 5), 2009) == 28
  assert age_from_dob(datenum(1981, 7, 1), 2009) == 27
  assert age_from_dob(datenum(1981, 6, 30), 2009) == 28
  assert age_from_dob(np.nan, 2009) is None and age_from_dob(1e12, 2009) is None


def test_imdb_mat_layout_and_cleaning(tmp_path):
  root = make_imdb(tmp_path)
  s = loadmat(root / "imdb.mat")["imdb"][0, 0]
  assert len(s["full_path"][0]) == len(IMDB_ROWS) and s["full_path"][0][0][0] == IMDB_ROWS[0][0]
  assert s["face_location"][0][0].shape == (1, 4) and s["dob"][0].shape == (len(IMDB_ROWS),)
  assert math.isinf(s["face_score"][0][2]) and math.isnan(s["second_face_score"][0][0])
  ds = load_dataset("imdb_wiki", str(root))
  expected_ages = sorted(r[6] for r in IMDB_ROWS if not isinstance(r[6], str))
  assert sorted(r.age for r in ds.records) == expected_ages
  by_path = {os.path.basename(r.path): r for r in ds.records}
  first = by_path["10000217_1981-05-05_2009.jpg"]
  assert first.gender == "M" and first.subject == "100" and first.source == "imdb.mat:row 1"
  assert first.extra["face_location"] == [10.5, 20.0, 110.0, 120.0] and first.extra["name"] == "A Person"
  assert by_path["nm0000001_1990-08-20_2010.jpg"].gender == "F"
  for r in IMDB_ROWS:
    if isinstance(r[6], str):
      assert ds.rejections.counts[r[6]] == 1, r[6]
  assert ds.rejections.total == len(IMDB_ROWS) - 2
  loose = load_dataset("imdb", str(root / "imdb.mat"), face_score_min=None, require_single_face=False,
                       require_gender=False)
  assert len(loose) == 5  # -inf, bogus dob, too old and missing still dropped
  with pytest.raises(DatasetError, match=r"imdb.mat:row 3 .*no face"):
    load_dataset("imdb", str(root), policy="strict")


def test_wiki_mat_has_no_subject(tmp_path):
  root = make_imdb(tmp_path, "wiki")
  ds = load_dataset("wiki", str(root), require_single_face=False)
  assert len(ds) == 3 and ds.records[0].source.startswith("wiki.mat:row")


def test_imdb_csv_variants(tmp_path):
  touch(str(tmp_path / "imdb_crop/01/a.jpg"))
  touch(str(tmp_path / "imdb_crop/01/b.jpg"))
  (tmp_path / "clean.csv").write_text("genders,ages,img_paths\n1,34,imdb_crop/01/a.jpg\n0,xx,imdb_crop/01/b.jpg\n"
                                      "0,20,imdb_crop/01/gone.jpg\n0,51,imdb_crop/01/b.jpg\n")
  ds = load_dataset("imdb", str(tmp_path / "clean.csv"))
  assert [(r.age, r.gender) for r in ds.records] == [(34, "M"), (51, "F")]
  assert ds.rejections.examples["malformed row (age not a number)"] == ["clean.csv:3"]
  assert ds.rejections.counts["missing file"] == 1
  sub = tmp_path / "ic"
  touch(str(sub / "imdb/00/x.jpg"))
  (sub / "imdb_train_new.csv").write_text("filename,age,gender,x_min,y_min,x_max,y_max,head_roll,head_yaw,head_pitch\n"
                                          "imdb/00/x.jpg,41,F,1,2,30,40,0.1,0.2,0.3\n")
  ds = load_dataset("imdb_clean", str(sub))
  assert ds.records[0].gender == "F" and ds.records[0].split == "train" and ds.records[0].extra["face_box"] == [
    1, 2, 30, 40]


@pytest.mark.parametrize("delim", [",", ";"])
@pytest.mark.parametrize("header", [True, False])
def test_lap_gt(tmp_path, delim, header):
  touch(str(tmp_path / "train/image_000001.jpg"))
  touch(str(tmp_path / "train/image_000001.jpg_face.jpg"))
  touch(str(tmp_path / "train/image_000002.jpg"))
  touch(str(tmp_path / "valid/image_004001.jpg"))
  rows = [("image_000001.jpg", "24.5", "3.2"), ("image_000002.jpg", "60", "5.1"), ("image_000003.jpg", "30", "2"),
          ("image_000004.jpg", "abc", "1")]
  head = delim.join(["image", "mean", "stdv"]) + "\n" if header else ""
  (tmp_path / "train_gt.csv").write_text(head + "".join(delim.join(r) + "\n" for r in rows))
  (tmp_path / "valid_gt.csv").write_text(head + delim.join(("image_004001.jpg", "41.25", "6.0")) + "\n")
  ds = load_dataset("lap", str(tmp_path))
  assert [(os.path.basename(r.path), r.age, r.age_std, r.split) for r in ds.records] == [
    ("image_000001.jpg_face.jpg", 24.5, 3.2, "train"), ("image_000002.jpg", 60.0, 5.1, "train"),
    ("image_004001.jpg", 41.25, 6.0, "valid")]
  line = 4 if header else 3
  assert ds.rejections.examples["missing file"] == [f"train_gt.csv:{line} (image_000003.jpg)"]
  assert ds.rejections.examples["malformed row (mean or std not a number)"] == [f"train_gt.csv:{line + 1}"]
  with pytest.raises(DatasetError, match=f"train_gt.csv:{line} "):
    load_dataset("lap", str(tmp_path), policy="strict")
  plain = load_dataset("lap", str(tmp_path), prefer_crops=False, csv=str(tmp_path / "train_gt.csv"))
  assert os.path.basename(plain.records[0].path) == "image_000001.jpg"


def test_appa_real(tmp_path):
  head = "file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n"
  (tmp_path / "gt_avg_train.csv").write_text(head + "000000.jpg,36,5.0,1.146423,4\n000001.jpg,63,20.33,3.23,18\n"
                                             "000002.jpg,40,x,1,20\n")
  (tmp_path / "gt_avg_test.csv").write_text(head + "005613.jpg,38,29.5,4.0,31\n")
  touch(str(tmp_path / "train/000000.jpg_face.jpg"))
  touch(str(tmp_path / "train/000000.jpg"))
  touch(str(tmp_path / "train/000001.jpg"))
  touch(str(tmp_path / "test/005613.jpg_face.jpg"))
  ds = load_dataset("appa_real", str(tmp_path))
  assert [(os.path.basename(r.path), r.age, r.age_std, r.split) for r in ds.records] == [
    ("005613.jpg_face.jpg", 29.5, 4.0, "test"), ("000000.jpg_face.jpg", 5.0, 1.146423, "train"),
    ("000001.jpg", 20.33, 3.23, "train")]
  assert ds.records[1].source == "gt_avg_train.csv:2" and ds.records[1].extra["real_age"] == 4
  assert ds.rejections.examples["malformed row (age field not a number)"] == ["gt_avg_train.csv:4"]
  real = load_dataset("appa_real", str(tmp_path), label="real")
  assert sorted(r.age for r in real.records) == [4, 18, 31] and all(r.age_std is None for r in real.records)


MORPH_HEAD = "id_num,picture_num,dob,doa,race,gender,facial_hair,age,age_diff,glasses,photo\n"


def test_morph_csv(tmp_path):
  touch(str(tmp_path / "Album2/092796_0M43.JPG"))
  touch(str(tmp_path / "Album2/092796_1M45.JPG"))
  touch(str(tmp_path / "Album2/123456_00F20.JPG"))
  (tmp_path / "morph_train.csv").write_text(
    MORPH_HEAD + "092796,0,06/12/1959,10/28/2002,B,M,0,43,0,0,Album2/092796_0M43.JPG\n"
    "092796,1,06/12/1959,02/10/2005,B,F,0,45,2,0,Album2/092796_1M45.JPG\n"
    "123456,00,01/01/1990,03/04/2010,W,F,0,20,0,1,Album2/123456_00F20.JPG\n"
    "000001,0,01/01/1990,03/04/2010,W,F,0,20,0,1,Album2/000001_0F20.JPG\n"
    "000002,0,01/01/1990\n")
  ds = load_dataset("morph", str(tmp_path))
  assert [(r.subject, r.age, r.gender, r.split) for r in ds.records] == [
    ("092796", 43, "M", "train"), ("092796", 45, "F", "train"), ("123456", 20, "F", "train")]
  assert ds.records[0].extra["dob"] == "1959-06-12" and ds.records[0].extra["doa"] == "2002-10-28"
  assert ds.rejections.counts[WARNING + "gender column disagrees with the file name (column kept)"] == 1
  assert ds.rejections.examples["missing file"] == ["morph_train.csv:5 (Album2/000001_0F20.JPG)"]
  assert ds.rejections.examples["malformed row (3 of 11 columns)"] == ["morph_train.csv:6"]


def test_morph_names_only(tmp_path):
  for n in ("092796_0M43.JPG", "092796_1M45.jpg", "123456_10F07.JPG", "bad_name.JPG"):
    touch(str(tmp_path / n))
  ds = load_dataset("morph", str(tmp_path))
  assert [(r.subject, r.age, r.gender) for r in ds.records] == [
    ("092796", 43, "M"), ("092796", 45, "M"), ("123456", 7, "F")]
  with pytest.raises(DatasetError, match="bad_name.JPG"):
    load_dataset("morph", str(tmp_path), policy="strict")


def test_fgnet(tmp_path):
  for n in ("078A11.JPG", "066A06a.JPG", "066a06b.jpg", "001A02.JPG", "Thumbs.db", "cover.jpg"):
    touch(str(tmp_path / "images" / n))
  ds = load_dataset("fgnet", str(tmp_path))
  assert sorted((r.subject, r.age, r.extra["variant"]) for r in ds.records) == [
    ("1", 2, None), ("66", 6, "a"), ("66", 6, "b"), ("78", 11, None)]
  assert ds.rejections.counts["file name not like 078A11.JPG"] == 1


def test_agedb(tmp_path):
  assert agedb_name("0_MariaCallas_35_f.jpg") == {"id": "0", "name": "MariaCallas", "age": 35, "gender": "F"}
  assert agedb_name("12_Jean_Paul Belmondo_70_m.jpg")["name"] == "Jean_Paul Belmondo"
  assert agedb_name("12_NoAge_m.jpg") is None
  for n in ("0_MariaCallas_35_f.jpg", "12_Jean_Paul Belmondo_70_m.jpg", "5_X_x_m.jpg", "7_Old Man_130_m.jpg"):
    touch(str(tmp_path / n))
  ds = load_dataset("agedb", str(tmp_path))
  assert sorted((r.subject, r.age, r.gender) for r in ds.records) == [
    ("Jean_Paul Belmondo", 70, "M"), ("MariaCallas", 35, "F")]
  assert ds.rejections.counts["age outside [0, 120]"] == 1
  assert ds.rejections.counts["file name not like 0_MariaCallas_35_f.jpg"] == 1


def test_generic_csv(tmp_path):
  touch(str(tmp_path / "img/a.png"))
  touch(str(tmp_path / "img/b.png"))
  (tmp_path / "labels.csv").write_text("path,age,age_std,split,subject\nimg/a.png,30,2.5,train,s1\n"
                                       "img/b.png,-3,,test,s2\nimg/b.png,nan,,test,s2\nimg/b.png,12,,,\n"
                                       "img/c.png,5,,,\nimg/b.png\n")
  ds = load_dataset("csv", str(tmp_path))
  assert [(r.age, r.age_std, r.split, r.subject, r.source) for r in ds.records] == [
    (30, 2.5, "train", "s1", "labels.csv:2"), (12, None, None, None, "labels.csv:5")]
  c = ds.rejections.counts
  assert c["negative age"] == 1 and c["age is not a finite number"] == 1 and c["missing file"] == 1
  assert c["malformed row (1 of 5 columns)"] == 1
  with pytest.raises(DatasetError, match="labels.csv:3: negative age"):
    load_dataset("csv", str(tmp_path / "labels.csv"), policy="strict")
  (tmp_path / "other.csv").write_text("file,label\n")
  with pytest.raises(DatasetError, match="'path' and 'age'"):
    load_dataset("generic", str(tmp_path / "other.csv"))


def test_csv_rows_one_loop(tmp_path):
  from agejax.data.readers.common import csv_rows
  from agejax.data.records import Rejections

  path = tmp_path / "t.csv"  # BOM, ';' delimiter, CRLF, a blank line, a quoted field over two lines, a short row
  path.write_bytes('\ufeffPath ; Age\r\n a.png ;30\r\n\r\n"b\r\nc.png";4\r\nd.png\r\n'.encode())
  rej = Rejections("skip")
  header, rows = csv_rows(str(path), rej, ("path", "age"))
  assert header == ["path", "age"]
  assert list(rows) == [("t.csv:2", {"path": "a.png", "age": "30"}), ("t.csv:4", {"path": "b\r\nc.png", "age": "4"})]
  assert rej.examples["malformed row (1 of 2 columns)"] == ["t.csv:5"]
  with pytest.raises(DatasetError, match=r"t.csv:5: malformed row \(1 of 2 columns\)"):
    list(csv_rows(str(path), Rejections("strict"))[1])


@pytest.mark.parametrize("fmt, name, head, missing", [
  ("morph", "morph_train.csv", "photo,age_years\n", "'age'"),
  ("appa_real", "gt_avg_train.csv", "file_name,apparent_age_avg,apparent_age_std\n", "'real_age'"),
  ("csv", "labels.csv", "path,label\n", "'age'"),
])
def test_csv_missing_column_names_file_and_column(tmp_path, fmt, name, head, missing):
  (tmp_path / name).write_text(head)
  options = {} if fmt == "appa_real" else {"csv": str(tmp_path / name)}
  with pytest.raises(DatasetError) as e:
    load_dataset(fmt, str(tmp_path), **options)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(str(tmp_path / name) + ": header must contain ")
  assert f"; missing {missing} (columns found: {head.strip().replace(',', ', ')})" in msg
