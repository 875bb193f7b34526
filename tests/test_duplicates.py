"""Exact and near duplicate detection, leak-free splits, and the real UTKFace duplicates."""

import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from agejax.data.duplicates import (
  check_split,
  exact_duplicate_groups,
  hamming,
  near_duplicate_groups,
  phash,
  split_without_leaks,
)
from agejax.data.records import AgeRecord
from agejax.errors import DatasetError

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "UTKFace")


def smooth_image(seed: int) -> Image.Image:
  small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
  return Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC)


@pytest.fixture
def folder(tmp_path):
  paths = []
  for i in range(6):
    p = str(tmp_path / f"img{i}.png")
    smooth_image(i).save(p)
    paths.append(p)
  shutil.copy(paths[0], tmp_path / "copy0.png")
  shutil.copy(paths[0], tmp_path / "copy0b.png")
  shutil.copy(paths[3], tmp_path / "copy3.png")
  smooth_image(1).save(tmp_path / "near1.jpg", quality=70)  # same picture, different bytes
  arr = np.asarray(smooth_image(2)).astype(int) + 6
  Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(tmp_path / "near2.png")
  return tmp_path, sorted(str(p) for p in tmp_path.iterdir())


def test_exact_groups(folder):
  tmp, paths = folder
  groups = exact_duplicate_groups(paths)
  assert groups == [sorted([str(tmp / "copy0.png"), str(tmp / "copy0b.png"), str(tmp / "img0.png")]),
                    sorted([str(tmp / "copy3.png"), str(tmp / "img3.png")])]


def test_near_groups(folder):
  tmp, paths = folder
  assert hamming(phash(str(tmp / "img1.png")), phash(str(tmp / "near1.jpg"))) <= 4
  assert hamming(phash(str(tmp / "img1.png")), phash(str(tmp / "img4.png"))) > 10
  groups = near_duplicate_groups(paths, max_distance=4)
  as_sets = [set(map(os.path.basename, g)) for g in groups]
  assert {"img1.png", "near1.jpg"} in as_sets and {"img2.png", "near2.png"} in as_sets
  assert {"img0.png", "copy0.png", "copy0b.png"} in as_sets and len(groups) == 4


def test_split_without_leaks(folder):
  tmp, paths = folder
  groups = exact_duplicate_groups(paths) + [[str(tmp / "img1.png"), str(tmp / "near1.jpg")]]
  records = [AgeRecord(path=p, age=float(i)) for i, p in enumerate(paths)]
  for seed in range(5):
    report = {}
    pool, test = split_without_leaks(records, 3, seed, groups, report)
    assert len(test) == 3 and not set(pool) & set(test)
    assert report["removed"] == 4 and len(pool) + len(test) == len(paths) - 4
    chosen = [paths[i] for i in pool + test]
    for g in groups:
      assert sum(p in chosen for p in g) == 1  # one member per group, on one side only
    assert split_without_leaks(records, 3, seed, groups) == (pool, test)
  assert split_without_leaks(records, 3, 0, groups) != split_without_leaks(records, 3, 1, groups)


def test_check_split(folder):
  tmp, paths = folder
  groups = exact_duplicate_groups(paths)
  train = [str(tmp / n) for n in ("img0.png", "img1.png", "copy3.png")]
  test = [str(tmp / n) for n in ("copy0.png", "img4.png")]
  with pytest.raises(DatasetError, match="1 training images duplicate"):
    check_split(train, test, groups)
  assert check_split(train, test, groups, action="remove") == train[1:]
  assert check_split(train[1:], test, groups) == train[1:]


@pytest.mark.skipif(not os.path.isdir(REAL), reason="real UTKFace folder (conftest.UTKFACE) absent")
def test_real_utkface_exact_duplicates():
  paths = sorted(os.path.join(REAL, f) for f in os.listdir(REAL))
  start = time.perf_counter()
  groups = exact_duplicate_groups(paths)
  seconds = time.perf_counter() - start
  assert len(groups) == 375 and sum(len(g) - 1 for g in groups) == 390
  assert seconds < 30, f"hashing took {seconds:.1f}s"
  with open(groups[0][0], "rb") as a, open(groups[0][1], "rb") as b:
    assert a.read() == b.read()
