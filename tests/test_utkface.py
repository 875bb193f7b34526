"""UTKFace reader: synthetic names with every real defect, policies, and the real folder."""

import os

import pytest

from agejax.data.readers import WARNING, load_dataset
from agejax.data.readers.utkface import parse_name
from agejax.errors import DatasetError

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "UTKFace")
needs_real = pytest.mark.skipif(not os.path.isdir(REAL), reason="real UTKFace folder (conftest.UTKFACE) absent")

GOOD = ["26_0_2_20170104023102422.jpg.chip.jpg", "1_1_4_20161221193016140.jpg.chip.jpg", "80_1_0_20170110131953974.jpg"]
LENIENT = ["39_1_20170116174525125.jpg.chip.jpg", "55_0_0_20170116232725357jpg.chip.jpg",
           "24_0_1_20170116220224657 .jpg.chip.jpg", "14_0_0_2017011022340900.jpg.chip.jpg"]


def _folder(tmp_path, names):
  tmp_path.mkdir(exist_ok=True)
  for n in names:
    (tmp_path / n).write_bytes(b"\xff\xd8" + n.encode())
  return str(tmp_path)


def test_parse_name_fields():
  labels, notes = parse_name("26_0_2_20170104023102422.jpg.chip.jpg")
  assert labels == {"age": 26.0, "gender": "M", "race": 2, "datetime": "20170104023102422"} and notes == []
  labels, notes = parse_name("39_1_20170116174525125.jpg.chip.jpg")
  assert labels["age"] == 39 and labels["gender"] == "F" and labels["race"] is None
  assert notes == ["3-field name, race unknown"]
  labels, notes = parse_name("55_0_0_20170116232725357jpg.chip.jpg")
  assert labels["datetime"] == "20170116232725357" and notes == ["damaged extension"]
  assert parse_name("abc_0_1_2017.jpg")[0] is None
  assert parse_name("30_2_1_20170104023102422.jpg")[1] == ["gender code not 0/1"]


def test_lenient_names_kept_and_reported(tmp_path):
  root = _folder(tmp_path, GOOD + LENIENT + ["README.txt", ".DS_Store"])
  ds = load_dataset("utkface", root, policy="strict")
  assert len(ds) == len(GOOD) + len(LENIENT)
  assert [r.path for r in ds.records] == sorted(r.path for r in ds.records)
  assert all(os.path.isabs(r.path) for r in ds.records)
  warnings = {k: v for k, v in ds.rejections.counts.items() if k.startswith(WARNING)}
  assert warnings[WARNING + "3-field name, race unknown (kept)"] == 1
  assert warnings[WARNING + "damaged extension (kept)"] == 2
  three = [r for r in ds.records if r.source.startswith("39_")][0]
  assert three.extra["race"] is None and three.age == 39


def test_bad_names_and_ages_per_policy(tmp_path):
  bad = ["x_0_1_20170104023102422.jpg.chip.jpg", "30_7_1_20170104023102422.jpg.chip.jpg",
         "130_0_1_20170104023102422.jpg.chip.jpg", "notes.weird"]
  root = _folder(tmp_path, GOOD + bad)
  with pytest.raises(DatasetError, match=r"130_0_1_.*age outside"):
    load_dataset("utkface", root, policy="strict")
  ds = load_dataset("utkface", root, policy="skip")
  assert len(ds) == len(GOOD)
  c = ds.rejections.counts
  assert c["unparsable UTKFace name"] == 1 and c["gender code not 0/1"] == 1
  assert c["age outside [0, 120]"] == 1 and c["not an image file name"] == 1
  assert len(load_dataset("utkface", root, max_age=200)) == len(GOOD) + 1
  strict_names = load_dataset("utkface", _folder(tmp_path / "sub", LENIENT), lenient_names=False)
  assert strict_names.rejections.counts["3-field name, race unknown"] == 1 and len(strict_names) == 0


@needs_real
def test_real_folder():
  ds = load_dataset("utkface", REAL, policy="strict")
  assert len(os.listdir(REAL)) == 23707 and len(ds) == 23707
  three = ds.rejections.counts[WARNING + "3-field name, race unknown (kept)"]
  assert three == 3
  ages = [r.age for r in ds.records]
  assert sum(a <= 10 for a in ages) == 3217 and sum(a >= 80 for a in ages) == 673
  assert {r.gender for r in ds.records} == {"M", "F"}
