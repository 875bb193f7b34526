"""Letterbox resizing, the dataset crop options (pad_fraction / pad_mode / crop_fraction) and their cache keys,
and the face_crop / resize_mode metadata a prior records."""

import numpy as np
import pytest
from PIL import Image

from agejax.data import cache
from agejax.data.images import adapt_crop, crop_fraction_center, pad_border, resize_image
from agejax.models.pretrained import Preprocess, face_crop_dict, read_face_crop


def test_letterbox_keeps_the_aspect_and_replicates_the_border():
  img = np.zeros((20, 10, 3), np.uint8)
  img[:, :5], img[:, 5:] = 50, 200  # distinct left and right halves
  out = resize_image(img, 8, "letterbox")
  assert out.shape == (8, 8, 3)
  # 20x10 -> 8x4 in the middle columns 2..5; the two columns each side repeat the edge pixels.
  np.testing.assert_array_equal(out[:, :2], np.repeat(out[:, 2:3], 2, axis=1))
  np.testing.assert_array_equal(out[:, 6:], np.repeat(out[:, 5:6], 2, axis=1))
  assert out[0, 0, 0] < 100 < out[0, 7, 0]
  sq = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
  np.testing.assert_array_equal(resize_image(sq, 8, "letterbox"), resize_image(sq, 8, "squash"))


def test_pad_and_crop_fractions():
  img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  edge = pad_border(img, 0.5)
  assert edge.shape == (8, 12, 3)  # 2 rows and 3 columns each side
  np.testing.assert_array_equal(edge[:2, 3:9], np.repeat(img[:1], 2, axis=0))
  mirror = pad_border(img, 0.5, "reflect")
  np.testing.assert_array_equal(mirror[1, 3:9], img[1])  # row 1 above the image mirrors row 1 below its edge
  np.testing.assert_array_equal(mirror[2:6, 3:9], img)
  assert crop_fraction_center(img, 0.5).shape == (2, 3, 3)
  np.testing.assert_array_equal(crop_fraction_center(img, 0.5), img[1:3, 1:4])
  assert adapt_crop(img) is img
  np.testing.assert_array_equal(adapt_crop(img, 1.0, "edge", 0.5), pad_border(img[1:3, 1:4], 1.0))  # crop, then pad
  with pytest.raises(ValueError, match="pad_mode"):
    pad_border(img, 0.1, "wrap")
  with pytest.raises(ValueError, match="crop_fraction"):
    crop_fraction_center(img, 0.0)


def test_load_images_applies_the_options_and_keys_them(tmp_path):
  rng = np.random.default_rng(0)
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
  cache_dir = str(tmp_path / "cache")
  plain, _ = cache.load_images(paths, 16, cache_dir, progress=False)
  padded, _ = cache.load_images(paths, 16, cache_dir, progress=False, pad_fraction=0.25)
  tight, _ = cache.load_images(paths, 16, cache_dir, progress=False, crop_fraction=0.5, pad_mode="reflect")
  from agejax.data.images import decode_image

  want = np.stack([resize_image(adapt_crop(decode_image(p), 0.25), 16) for p in paths])
  np.testing.assert_array_equal(padded, want)
  assert not np.array_equal(plain, padded) and not np.array_equal(plain, tight)
  entries = sorted(p.name for p in (tmp_path / "cache").glob("*.npy"))
  assert len(entries) == 3  # one cache entry per option set
  # The default options keep the key of a plain decode (older caches stay valid).
  stamps = cache._file_stamps(paths)
  assert f"{cache.cache_key(paths, 16, 'squash', stamps)}.npy" in entries
  again, _ = cache.load_images(paths, 16, cache_dir, progress=False, pad_fraction=0.25)
  np.testing.assert_array_equal(again, padded)


def test_prior_metadata_conventions():
  assert read_face_crop({"model": {}}) == {"convention": "chip"}
  assert face_crop_dict({"convention": "aligned5", "padding": "0.2"}) == {"convention": "aligned5", "padding": 0.2}
  with pytest.raises(ValueError, match="convention"):
    face_crop_dict({"convention": "tight"})
  old = {"channel_order": "RGB", "scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1], "resize": 64, "crop": 64}
  assert Preprocess.from_dict(old).resize_mode == "squash"  # priors written before resize_mode existed
  with pytest.raises(ValueError, match="resize_mode"):
    Preprocess(resize_mode="stretch")


def test_utkface_config_age_priors():
  from configs import utkface

  c = utkface.get_config("wrn=/p/wrn,dlib=/p/dlib,scratch=False")
  assert [(p["name"], p["dir"], p["head"]) for p in c.priors] == [
      ("wrn-paper", "/p/wrn", "keep"), ("wrn-tuned", "/p/wrn", "keep"),
      ("dlib-paper", "/p/dlib", "keep"), ("dlib-tuned", "/p/dlib", "keep")]
  assert all(p["backbone_overrides"] == {"bn_train": False} for p in c.priors)
  # each prior's own crop view: the WRN pads UTKFace's tight chips, dlib's net takes them as they are
  assert [p["data"]["pad_fraction"] for p in c.priors] == [0.4, 0.4, 0.0, 0.0]
  assert c.data.crop == 64 and (c.data.pad_fraction, c.data.pad_mode, c.data.crop_fraction) == (0.0, "edge", 1.0)
  assert c.priors[0]["optim"]["base_lr"] == 1e-4 and c.priors[0]["optim"]["name"] == "caffe_sgd"  # the paper's
  assert c.priors[0]["freeze"] == "none" and c.priors[2]["freeze"] == "none"  # whole networks off the CPU
  # the -tuned priors train around a calibration of the kept head's age (docs/real_priors.md)
  assert [p.get("head_options") for p in c.priors] == [None, {"calibrate": 33.0}, None, {"calibrate": 33.0}]
  local = utkface.get_config("runlocal,wrn=/p/wrn,dlib=/p/dlib,scratch=False")
  assert [p["freeze"] for p in local.priors] == ["backbone", "backbone", "none", "backbone"]
  assert [row[0] for row in local.sizes] == [3, 6, 9, 12, 24, 49] and local.sizes[0] == (3, 32, 3, 15)
  with pytest.raises(ValueError, match="64 px"):
    utkface.get_config("wrn=/p/wrn,res=224")


def test_calibration_variants_config():
  """docs/real_priors_variants.py: the study's runlocal data and sizes, one entry per variant, each from its prior."""
  import importlib.util
  import pathlib

  from configs import utkface

  path = pathlib.Path(__file__).parents[1] / "docs" / "real_priors_variants.py"
  spec = importlib.util.spec_from_file_location("real_priors_variants", path)
  variants = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(variants)
  c = variants.get_config("wrn=/p/wrn,dlib=/p/dlib")
  names = [p["name"] for p in c.priors]
  assert names == ["wrn-head", "wrn-calib", "wrn-calib-head", "dlib-head", "dlib-calib", "dlib-calib-1e-3",
                   "dlib-calib-head"]
  assert [p["dir"] for p in c.priors] == ["/p/wrn"] * 3 + ["/p/dlib"] * 4
  assert [p["data"]["pad_fraction"] for p in c.priors] == [0.4] * 3 + [0.0] * 4
  assert all(p["freeze"] == "backbone" for p in c.priors) and c.data.pool_limit == 600
  tuned = {p["name"]: p for p in utkface.get_config("runlocal,wrn=/p/wrn,dlib=/p/dlib,paper=False").priors}
  for variant, prior in (("wrn-calib-head", "wrn-tuned"), ("dlib-calib", "dlib-tuned")):  # the config's choices
    entry = c.priors[names.index(variant)]
    assert (entry["optim"], entry["head_options"]) == (tuned[prior]["optim"], tuned[prior]["head_options"])
  with pytest.raises(ValueError, match="wrn=DIR and/or dlib=DIR"):
    variants.get_config("")
