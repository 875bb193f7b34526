"""Image decoding (modes, EXIF, corrupt and truncated files) and the geometric helpers."""

import glob
import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from agejax.data.images import DEFAULT_ROTATION_ANGLES, center_crop, decode_image, resize_image, rotated_versions
from agejax.errors import DatasetError

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "UTKFace")
needs_real = pytest.mark.skipif(not os.path.isdir(REAL), reason="real UTKFace folder (conftest.UTKFACE) absent")


def _noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(img, **kw):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "JPEG", quality=90, **kw)
  return buf.getvalue()


@needs_real
def test_decodes_real_utkface_jpeg():
  path = sorted(glob.glob(os.path.join(REAL, "*.jpg")))[0]
  img = decode_image(path)
  assert img.shape == (200, 200, 3) and img.dtype == np.uint8 and img.std() > 5


def test_modes_become_rgb(tmp_path):
  gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
  Image.fromarray(gray, "L").save(tmp_path / "g.png")
  rgba = np.dstack([_noise(12, 10), np.full((12, 10), 7, np.uint8)])
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  Image.fromarray(_noise(12, 10)).convert("CMYK").save(tmp_path / "c.jpg")
  Image.fromarray(_noise(12, 10)).convert("P").save(tmp_path / "p.png")

  g = decode_image(str(tmp_path / "g.png"))
  assert g.shape == (12, 10, 3) and np.array_equal(g[..., 0], gray) and np.array_equal(g[..., 2], gray)
  a = decode_image(str(tmp_path / "a.png"))
  assert a.shape == (12, 10, 3) and np.array_equal(a, rgba[..., :3])
  for name in ("c.jpg", "p.png"):
    x = decode_image(str(tmp_path / name))
    assert x.shape == (12, 10, 3) and x.dtype == np.uint8


def test_exif_orientation_applied(tmp_path):
  img = np.zeros((10, 20, 3), np.uint8)
  img[:3, :3] = (255, 0, 0)  # red block at the stored image's top-left
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  Image.fromarray(img).save(tmp_path / "o.jpg", quality=100, exif=exif.tobytes())
  out = decode_image(str(tmp_path / "o.jpg"))
  assert out.shape == (20, 10, 3)
  assert out[1, -2, 0] > 200 and out[1, 1, 0] < 50  # top-left moved to top-right


def test_truncated_jpeg_fails_instead_of_loading_partially(tmp_path):
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False
  data = _jpeg_bytes(_noise(64, 64))
  path = tmp_path / "cut.jpg"
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(DatasetError, match=r"cut\.jpg.*truncated"):
    decode_image(str(path))


def test_truncated_fails_even_if_switch_flipped(tmp_path, monkeypatch):
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  path = tmp_path / "ok.jpg"
  path.write_bytes(_jpeg_bytes(_noise(8, 8)))
  with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
    decode_image(str(path))


def test_garbage_and_missing_files_name_the_file(tmp_path):
  (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8not a jpeg at all")
  with pytest.raises(DatasetError, match=r"junk\.jpg: cannot decode image \(UnidentifiedImageError"):
    decode_image(str(tmp_path / "junk.jpg"))
  with pytest.raises(DatasetError, match=r"nope\.jpg: missing file"):
    decode_image(str(tmp_path / "nope.jpg"))


def _stripes():
  """100x300 image: red, green, blue vertical thirds."""
  img = np.zeros((100, 300, 3), np.uint8)
  for k in range(3):
    img[:, 100 * k:100 * (k + 1), k] = 255
  return img


def test_resize_squash_keeps_whole_image():
  out = resize_image(_stripes(), 60, "squash")
  assert out.shape == (60, 60, 3)
  assert out[30, 2, 0] == 255 and out[30, 30, 1] == 255 and out[30, 57, 2] == 255


def test_resize_shorter_crop_keeps_aspect_and_centre():
  out = resize_image(_stripes(), 50, "shorter_crop")
  assert out.shape == (50, 50, 3)
  inner = out[:, 2:-2]  # the antialiasing filter blends the outermost columns with the neighbouring thirds
  assert np.all(inner[..., 1] == 255) and np.all(inner[..., 0] == 0) and np.all(inner[..., 2] == 0)


def test_resize_identity_and_bad_mode():
  img = _noise(16, 16)
  assert np.array_equal(resize_image(img, 16), img)
  with pytest.raises(ValueError, match="resize mode"):
    resize_image(img, 8, "stretch")


def test_center_crop_offsets():
  img = _noise(9, 8)
  np.testing.assert_array_equal(center_crop(img, 4), img[2:6, 2:6])
  np.testing.assert_array_equal(center_crop(img, 3), img[3:6, 2:5])  # odd margins round down
  with pytest.raises(ValueError):
    center_crop(img, 10)


def test_rotated_versions():
  img = _noise(12, 12)
  assert len(DEFAULT_ROTATION_ANGLES) == 10
  outs = rotated_versions(img)
  assert len(outs) == 10 and all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
  assert not any(np.array_equal(o, img) for o in outs)
  zero, quarter = rotated_versions(img, (0, 90))
  np.testing.assert_array_equal(zero, img)
  np.testing.assert_array_equal(quarter, np.rot90(img))  # positive = counter-clockwise
