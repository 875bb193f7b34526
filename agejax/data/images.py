"""Image decoding and the few geometric operations the protocols need, on RGB uint8 HWC numpy arrays."""

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

from agejax.errors import DatasetError

ResizeMode = Literal["squash", "shorter_crop"]
RESIZE_MODES = ("squash", "shorter_crop")

# The paper stores each LAP training image with 10 rotated copies but does not give the angles; these are ours.
DEFAULT_ROTATION_ANGLES = (-10.0, -7.5, -5.0, -2.5, -1.0, 1.0, 2.5, 5.0, 7.5, 10.0)

_RESAMPLE = Image.Resampling.BILINEAR


def decode_image(path: str) -> np.ndarray:
  """Reads an image file as RGB uint8 (H, W, 3), EXIF orientation applied.

  Grayscale, palette, RGBA (alpha dropped) and CMYK images are converted to RGB. A missing, corrupt or
  truncated file raises DatasetError naming the file and PIL's reason; a truncated JPEG never loads partially.
  """
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    # Someone turned on PIL's global switch; truncated files would then decode as grey-padded images.
    raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; agejax needs it False to reject truncated files")
  try:
    with Image.open(path) as im:
      im.load()
      im = ImageOps.exif_transpose(im)
      if im.mode != "RGB":
        im = im.convert("RGB")
      return np.asarray(im, dtype=np.uint8)
  except FileNotFoundError as e:
    raise DatasetError(f"{path}: missing file ({e.strerror})") from e
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _resize_exact(img: np.ndarray, height: int, width: int) -> np.ndarray:
  if img.shape[:2] == (height, width):
    return img
  return np.asarray(Image.fromarray(img).resize((width, height), _RESAMPLE))


def center_crop(img: np.ndarray, crop: int) -> np.ndarray:
  """Central crop x crop window (offsets rounded down, as Caffe's test-time crop)."""
  h, w = img.shape[:2]
  if crop > h or crop > w:
    raise ValueError(f"crop {crop} is larger than the image ({h}x{w})")
  top, left = (h - crop) // 2, (w - crop) // 2
  return img[top:top + crop, left:left + crop]


def resize_image(img: np.ndarray, size: int, mode: ResizeMode = "squash") -> np.ndarray:
  """Resizes to size x size (bilinear, antialiased when shrinking).

  'squash' ignores the aspect ratio (the paper's 256x256); 'shorter_crop' scales the shorter side to
  `size`, keeping the aspect ratio, then takes the central square.
  """
  if mode == "squash":
    return _resize_exact(img, size, size)
  if mode == "shorter_crop":
    h, w = img.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return center_crop(_resize_exact(img, nh, nw), size)
  raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def rotated_versions(img: np.ndarray, angles: Sequence[float] = DEFAULT_ROTATION_ANGLES,
                     fill: tuple[int, int, int] = (0, 0, 0)) -> list[np.ndarray]:
  """One copy of `img` per angle (degrees, counter-clockwise), rotated about the centre, same size.

  The paper stores each LAP training image as the original plus 10 rotated versions but does not give
  the angles; DEFAULT_ROTATION_ANGLES is our choice. The original is not included in the result.
  Corners uncovered by the rotation are filled with `fill`.
  """
  pil = Image.fromarray(img)
  return [np.asarray(pil.rotate(float(a), resample=_RESAMPLE, expand=False, fillcolor=fill)) for a in angles]
