"""The decoded-image cache: hits without decoding, keys, atomic writes, bad files under both policies."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from agejax.data import cache
from agejax.data.cache import default_cache_dir, load_images
from agejax.data.records import Rejections
from agejax.errors import DatasetError

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "UTKFace")
needs_real = pytest.mark.skipif(not os.path.isdir(REAL), reason="real UTKFace folder (conftest.UTKFACE) absent")


@pytest.fixture
def pngs(tmp_path):
  """Six distinct lossless 16x16 images; returns (paths, arrays)."""
  rng = np.random.default_rng(0)
  d = tmp_path / "imgs"
  d.mkdir()
  paths, arrays = [], []
  for i in range(6):
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    p = str(d / f"{i}.png")
    Image.fromarray(a).save(p)
    paths.append(p)
    arrays.append(a)
  return paths, np.stack(arrays)


def _entries(cache_dir):
  return sorted(os.listdir(cache_dir))


def _no_decode(monkeypatch):
  def fail(path):
    raise AssertionError(f"decoded {path} although it should come from the cache")
  monkeypatch.setattr(cache, "decode_image", fail)


def test_decodes_exactly_and_second_call_reads_cache(pngs, tmp_path, monkeypatch):
  paths, arrays = pngs
  cdir = str(tmp_path / "c")
  imgs, kept = load_images(paths, 16, cdir, progress=False, workers=2)
  np.testing.assert_array_equal(imgs, arrays)
  np.testing.assert_array_equal(kept, np.arange(6))
  files = _entries(cdir)
  assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")  # no temp files left
  meta = json.load(open(os.path.join(cdir, files[0])))
  assert meta["count"] == 6 and meta["kept"] == list(range(6)) and meta["rejected"] == []

  _no_decode(monkeypatch)
  again, kept2 = load_images(paths, 16, cdir, progress=False)
  assert isinstance(again, np.memmap) and not again.flags.writeable
  np.testing.assert_array_equal(again, arrays)
  np.testing.assert_array_equal(kept2, kept)


def test_key_changes_with_size_list_order_and_mtime(pngs, tmp_path, monkeypatch):
  paths, _ = pngs
  cdir = str(tmp_path / "c")
  load_images(paths, 16, cdir, progress=False)
  load_images(paths, 8, cdir, progress=False)
  load_images(paths[:5], 16, cdir, progress=False)
  load_images(paths[::-1], 16, cdir, progress=False)
  load_images(paths, 16, cdir, resize="shorter_crop", progress=False)
  assert len(_entries(cdir)) == 10
  st = os.stat(paths[0])
  os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  out, _ = load_images(paths, 16, cdir, progress=False)
  assert len(_entries(cdir)) == 12
  assert out.shape == (6, 16, 16, 3)


def test_no_cache_dir_returns_in_memory_array(pngs):
  paths, arrays = pngs
  imgs, kept = load_images(paths, 8, None, progress=False, workers=1)
  assert type(imgs) is np.ndarray and imgs.shape == (6, 8, 8, 3) and imgs.dtype == np.uint8
  np.testing.assert_array_equal(kept, np.arange(6))


def test_process_backend_matches_threads(pngs):
  paths, _ = pngs
  a, _ = load_images(paths, 12, None, progress=False, workers=2, backend="thread")
  b, _ = load_images(paths, 12, None, progress=False, workers=2, backend="process")
  np.testing.assert_array_equal(a, b)


def _spoil(paths, tmp_path):
  """Makes paths[1] a truncated PNG and paths[4] missing."""
  data = open(paths[1], "rb").read()
  open(paths[1], "wb").write(data[: len(data) // 2])
  os.remove(paths[4])


def test_strict_raises_naming_file_and_leaves_no_cache(pngs, tmp_path):
  paths, _ = pngs
  _spoil(paths, tmp_path)
  cdir = str(tmp_path / "c")
  with pytest.raises(DatasetError, match=r"4\.png: missing file"):
    load_images(paths, 16, cdir, progress=False)
  with pytest.raises(DatasetError, match=r"1\.png: cannot decode image .*truncated.*corrupt image"):
    load_images(paths[:4], 16, cdir, progress=False, rejections=Rejections("strict"))
  assert _entries(cdir) == []


def test_skip_drops_counts_and_aligns(pngs, tmp_path, monkeypatch):
  paths, arrays = pngs
  _spoil(paths, tmp_path)
  cdir = str(tmp_path / "c")
  rej = Rejections("skip")
  imgs, kept = load_images(paths, 16, cdir, progress=False, rejections=rej)
  np.testing.assert_array_equal(kept, [0, 2, 3, 5])
  np.testing.assert_array_equal(imgs, arrays[kept])
  assert rej.counts == {"corrupt image": 1, "missing file": 1}
  assert rej.examples["corrupt image"] == [paths[1]]

  _no_decode(monkeypatch)
  rej2 = Rejections("skip")
  imgs2, kept2 = load_images(paths, 16, cdir, progress=False, rejections=rej2)
  np.testing.assert_array_equal(kept2, kept)
  np.testing.assert_array_equal(imgs2, imgs)
  assert rej2.counts == rej.counts  # the cache replays what it rejected
  with pytest.raises(DatasetError, match=r"4\.png: missing file"):
    load_images(paths, 16, cdir, progress=False)  # a strict caller still fails on a cache hit


def test_interrupted_run_leaves_nothing_trusted(pngs, tmp_path, monkeypatch):
  paths, arrays = pngs
  cdir = str(tmp_path / "c")
  real_decode = cache.decode_image
  calls = []

  def dies_on_third(path):
    calls.append(path)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real_decode(path)

  monkeypatch.setattr(cache, "decode_image", dies_on_third)
  with pytest.raises(KeyboardInterrupt):
    load_images(paths, 16, cdir, progress=False, workers=1)
  assert _entries(cdir) == []
  monkeypatch.setattr(cache, "decode_image", real_decode)

  # An array without its JSON (killed between the two renames) is not trusted and is rewritten.
  imgs, _ = load_images(paths, 16, cdir, progress=False)
  npy = [f for f in _entries(cdir) if f.endswith(".npy")][0]
  os.remove(os.path.join(cdir, npy[:-4] + ".json"))
  np.save(os.path.join(cdir, npy), np.zeros((6, 16, 16, 3), np.uint8))
  again, _ = load_images(paths, 16, cdir, progress=False)
  np.testing.assert_array_equal(again, arrays)


def test_default_cache_dir(monkeypatch):
  monkeypatch.setenv("AGEJAX_CACHE", "/somewhere/else")
  assert default_cache_dir() == "/somewhere/else"
  monkeypatch.delenv("AGEJAX_CACHE")
  assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "agejax")


@needs_real
def test_real_utkface_subset(tmp_path):
  paths = sorted(glob.glob(os.path.join(REAL, "*.jpg")))[:40]
  imgs, kept = load_images(paths, 32, str(tmp_path), progress=False)
  assert imgs.shape == (40, 32, 32, 3) and imgs.std() > 10
  np.testing.assert_array_equal(kept, np.arange(40))
