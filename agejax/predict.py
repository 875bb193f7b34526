"""Predict ages for the faces in photos with a saved model (a trial checkpoint or any age prior directory).

  python -m agejax.predict --checkpoint PRIOR photo.jpg folder/ [--faces largest] [--out ages.csv] [--annotate DIR]
  python -m agejax.predict --checkpoint PRIOR --aligned chips/          # pre-cropped face chips, as they are

Folders are searched recursively for .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif/.tiff files. Each photo's faces are
found with dlib's HOG detector and 5 landmarks (agejax.data.faces), cropped the way the prior's weights were
trained (its `face_crop`: box with margin, letterbox, 5-point aligned chip), resized to the prior's `resize`,
centre-cropped to its `crop`, preprocessed and run in batches. With --aligned every file is one face chip,
resized whole (no detection). Output: one line per face, `path face left top right bottom age [age_sd]` as TSV
on stdout (a header first), or --out FILE.csv / FILE.json; the box is in the photo's pixels (right and bottom
exclusive; the whole image with --aligned); age_sd, the SD of the predicted age distribution, is given for
heads that predict one (DEX and the other binned heads).

A file that is missing, not an image, unreadable, or has no face gets one line on stderr (`PATH: reason`) and
the rest are still predicted. Exit status: 0 when every file gave an age; else the number of files that failed,
at most 100; 101 when nothing could run (a bad checkpoint or argument, no input files).
"""

import argparse
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax.errors import AgejaxError, DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_FAILED_STATUS = 100
FATAL_STATUS = 101


# ------------------------------------------------------------------------------------------------ the model


def age_decoder(spec: Mapping[str, Any], where: str = "") -> Callable[[jax.Array], tuple[jax.Array, Any]]:
  """fn(head outputs (B, K)) -> (ages (B,), SD (B,) of the predicted age distribution, or None for heads
  without one); fn.has_sd says which. The SD is sqrt(sum_k p_k (v_k - m)^2) over the bin ages v_k, m = sum_k p_k v_k."""
  from agejax.models import heads

  if hasattr(heads, "age_head"):
    try:
      head = heads.age_head(spec)
    except AgejaxError as e:
      raise AgejaxError(f"{where}: {e}") from None

    def decode(outputs):
      age = head.decode(outputs)
      if not head.has_distribution:
        return age, None
      probs, bins = head.distribution(outputs)
      return age, _sd(probs, bins)
    decode.has_sd = head.has_distribution
    return decode

  kind = spec.get("head")  # heads.py before age_head: 'dex' (bins 0..K-1 unless bin_values) and 'regression'
  if kind not in ("dex", "regression"):
    raise AgejaxError(f"{where}: its {kind!r} head does not predict age (fine-tune it with a 'dex' or "
                      "'regression' head first)")

  def decode_old(outputs):
    outputs = outputs.astype(jnp.float32)
    if kind == "regression":
      return outputs[..., 0], None
    bins = jnp.asarray(spec.get("bin_values") or np.arange(outputs.shape[-1]), jnp.float32)
    probs = jax.nn.softmax(outputs, axis=-1)
    return probs @ bins, _sd(probs, bins)
  decode_old.has_sd = kind != "regression"
  return decode_old


def _sd(probs: jax.Array, bins: jax.Array) -> jax.Array:
  mean = probs @ bins
  return jnp.sqrt(jnp.maximum(jnp.sum(probs * jnp.square(bins - mean[..., None]), axis=-1), 0.0))


@dataclasses.dataclass
class Predictor:
  """A loaded prior ready to predict: metadata, crop convention and a jitted (images -> ages, SDs)."""

  checkpoint: str
  meta: dict[str, Any]
  preprocess: Any
  face_crop: Any
  run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]

  @classmethod
  def load(cls, checkpoint: str) -> "Predictor":
    from agejax.data.faces import FaceCrop
    from agejax.models import load_pretrained
    from agejax.models.pretrained import read_prior_metadata

    meta = read_prior_metadata(checkpoint)
    decode = age_decoder(meta.get("model", {}), checkpoint)
    try:
      face_crop = FaceCrop.from_metadata(meta)
    except AgejaxError as e:
      raise AgejaxError(f"{checkpoint}: {e}") from None
    model, variables, preprocess = load_pretrained(checkpoint)

    @jax.jit
    def apply(v, x):
      return decode(model.apply(v, preprocess(x), train=False))

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
      age, sd = apply(variables, images)
      return np.asarray(age), None if sd is None else np.asarray(sd)

    return cls(checkpoint, meta, preprocess, face_crop, run)

  @property
  def synthetic(self) -> bool:
    return bool((self.meta.get("training_data") or {}).get("synthetic"))

  def prepare(self, img: np.ndarray, face: Any) -> np.ndarray:
    """The model input (crop, crop, 3) uint8 for a face of `img` (None: `img` is the face chip)."""
    from agejax.data.faces import crop_face
    from agejax.data.images import center_crop

    p = self.preprocess
    return center_crop(crop_face(img, face, self.face_crop, p.resize, getattr(p, "resize_mode", "squash")), p.crop)

  def predict(self, crops: Sequence[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Ages (and SDs) of model inputs, in batches of `batch_size` (a short batch padded to a power of two, so a
    few compiled programs serve any count)."""
    ages, sds = [], []
    for start in range(0, len(crops), batch_size):
      batch = np.stack(crops[start:start + batch_size])
      n = len(batch)
      padded = min(batch_size, 1 << (n - 1).bit_length())  # a power of two: few compiled batch shapes
      if padded > n:
        batch = np.concatenate([batch, np.zeros((padded - n,) + batch.shape[1:], batch.dtype)])
      age, sd = self.run(batch)
      ages.append(age[:n])
      sds.append(None if sd is None else sd[:n])
    if not ages:
      return np.zeros((0,), np.float32), None
    return np.concatenate(ages), None if sds[0] is None else np.concatenate(sds)


def predict_ages(checkpoint: str, paths: Sequence[str], batch_size: int = 32) -> np.ndarray:
  """Predicted ages (years) of face-chip image files (each file one face, used whole, as --aligned)."""
  from agejax.data.images import decode_image

  m = Predictor.load(checkpoint)
  return m.predict([m.prepare(decode_image(p), None) for p in paths], batch_size)[0]


# ------------------------------------------------------------------------------------------------ inputs


def find_images(args: Iterable[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """([(path, name under --annotate)], [(path, error)]): files as given, folders walked (sorted, recursive) for
  IMAGE_EXTENSIONS; a path that does not exist is an error."""
  found, errors = [], []
  for arg in args:
    if os.path.isdir(arg):
      for root, dirs, files in os.walk(arg):
        dirs.sort()
        for f in sorted(files):
          if f.lower().endswith(IMAGE_EXTENSIONS):
            path = os.path.join(root, f)
            found.append((path, os.path.relpath(path, arg)))
    elif os.path.exists(arg):
      found.append((arg, os.path.basename(arg)))
    else:
      errors.append((arg, "missing file"))
  return found, errors


def read_photo(path: str) -> np.ndarray:
  """The image, or DatasetError with a one-line reason: 'empty file', 'not an image', 'unreadable image (...)'."""
  from PIL import UnidentifiedImageError

  from agejax.data.images import decode_image

  try:
    if os.path.getsize(path) == 0:
      raise DatasetError("empty file (0 bytes)")
  except OSError as e:
    raise DatasetError(f"cannot read file ({e.strerror or e})") from None
  try:
    return decode_image(path)
  except DatasetError as e:
    if isinstance(e.__cause__, UnidentifiedImageError):
      raise DatasetError("not an image (no image format recognises it)") from None
    if isinstance(e.__cause__, FileNotFoundError):
      raise DatasetError("missing file") from None
    reason = str(e)[len(path) + 2:] if str(e).startswith(path + ": ") else str(e)
    reason = reason.removeprefix("cannot decode image ")  # "(OSError: image file is truncated ...)"
    raise DatasetError(f"unreadable image {reason}") from None


# ------------------------------------------------------------------------------------------------ outputs


def _columns(with_sd: bool) -> list[str]:
  return ["path", "face", "left", "top", "right", "bottom", "age"] + (["age_sd"] if with_sd else [])


def _row(rec: dict[str, Any], with_sd: bool) -> list[str]:
  out = [rec["path"], str(rec["face"])] + [str(round(v)) for v in rec["box"]] + [f"{rec['age']:.2f}"]
  return out + ([f"{rec['age_sd']:.2f}"] if with_sd else [])


def annotate(img: np.ndarray, records: Sequence[dict[str, Any]], out_path: str) -> None:
  """Writes `img` with each face's box and age drawn."""
  from PIL import Image, ImageDraw, ImageFont

  im = Image.fromarray(img)
  draw = ImageDraw.Draw(im)
  side = min(im.size)
  width = max(2, side // 250)
  font = ImageFont.load_default(size=max(12, side // 25))
  for rec in records:
    left, top, right, bottom = rec["box"]
    draw.rectangle([left, top, right - 1, bottom - 1], outline=(255, 40, 40), width=width)
    label = f"{rec['age']:.0f}" + (f" ±{rec['age_sd']:.0f}" if rec.get("age_sd") is not None else "")
    tb = draw.textbbox((left, top), label, font=font)
    y = top - (tb[3] - tb[1]) - 2 * width if top > (tb[3] - tb[1]) + 2 * width else bottom + width
    draw.rectangle([left, y, left + (tb[2] - tb[0]) + 2 * width, y + (tb[3] - tb[1]) + 2 * width], fill=(255, 40, 40))
    draw.text((left + width, y + width - (tb[1] - top)), label, fill=(255, 255, 255), font=font)
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  im.save(out_path)


def _annotate_name(name: str, used: set[str]) -> str:
  stem, ext = os.path.splitext(name)
  ext = ext if ext.lower() in (".jpg", ".jpeg", ".png") else ".png"
  out, i = stem + ext, 2
  while out in used:
    out, i = f"{stem}_{i}{ext}", i + 1
  used.add(out)
  return out


# ------------------------------------------------------------------------------------------------ the CLI


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> None:  # one line, and the fatal status the help promises
    self.exit(FATAL_STATUS, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m agejax.predict", description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a prior directory (e.g. WORKDIR/checkpoints/PRIOR/n00300_best)")
  p.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
  p.add_argument("--faces", choices=["all", "largest"], default="all", help="faces per photo (default: all)")
  p.add_argument("--aligned", action="store_true", help="the images are face chips: no detection, each used whole")
  p.add_argument("--detector", choices=["hog", "cnn"], default="hog",
                 help="dlib's HOG detector (default) or its CNN (slower on a CPU; see docs/faces.md)")
  p.add_argument("--upsample", type=int, default=0,
                 help="double each photo N times before detecting: finds faces down to ~40 px at 1 (~80 px at 0), "
                 "slower")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--out", help="write FILE.csv or FILE.json instead of TSV on stdout")
  p.add_argument("--annotate", metavar="DIR", help="write each image with its faces' boxes and ages drawn to DIR")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.out and not args.out.lower().endswith((".csv", ".json")):
    print(f"error: --out {args.out}: must end in .csv or .json", file=sys.stderr)
    return FATAL_STATUS
  if args.batch_size < 1 or args.upsample < 0:
    print(f"error: need --batch-size >= 1 and --upsample >= 0, got {args.batch_size}, {args.upsample}",
          file=sys.stderr)
    return FATAL_STATUS
  files, errors = find_images(args.images)
  for path, reason in errors:
    print(f"{path}: {reason}", file=sys.stderr)
  if not files:
    print("error: no image files found in " + " ".join(args.images), file=sys.stderr)
    return FATAL_STATUS
  try:
    model = Predictor.load(args.checkpoint)
  except AgejaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return FATAL_STATUS
  if model.synthetic:
    name = (model.meta.get("training_data") or {}).get("name", "synthetic")
    print(f"warning: {args.checkpoint} was trained on synthetic data ({name}); its ages for real faces mean "
          "nothing", file=sys.stderr)
  from agejax.data.faces import FaceDetector, select_faces

  detector = None if args.aligned else FaceDetector(name=args.detector, upsample=args.upsample)
  records: list[dict[str, Any]] = []
  failed = {p for p, _ in errors}
  error_list = [{"path": p, "error": r} for p, r in errors]
  used: set[str] = set()
  with_sd, header_done = None, False
  chunk = max(1, args.batch_size)
  for start in range(0, len(files), chunk):
    pending = []  # (path, annotate name, image, [(face index, box)], first crop index)
    crops = []
    for path, name in files[start:start + chunk]:
      try:
        img = read_photo(path)
      except DatasetError as e:
        print(f"{path}: {e}", file=sys.stderr)
        failed.add(path)
        error_list.append({"path": path, "error": str(e)})
        continue
      if detector is None:
        faces = [None]
      else:
        faces = select_faces(detector(img), args.faces)
        if not faces:
          print(f"{path}: no face found", file=sys.stderr)
          failed.add(path)
          error_list.append({"path": path, "error": "no face found"})
          continue
      h, w = img.shape[:2]
      boxes = [(0.0, 0.0, float(w), float(h)) if f is None else f.box for f in faces]
      pending.append((path, name, img if args.annotate else None, boxes, len(crops)))
      crops.extend(model.prepare(img, f) for f in faces)
    if not crops:
      continue
    ages, sds = model.predict(crops, args.batch_size)
    with_sd = sds is not None
    for path, name, img, boxes, first in pending:
      recs = [{"path": path, "face": k, "box": [float(v) for v in box], "age": float(ages[first + k]),
               **({"age_sd": float(sds[first + k])} if with_sd else {})} for k, box in enumerate(boxes)]
      records.extend(recs)
      if args.out is None:
        if not header_done:
          print("\t".join(_columns(with_sd)))
          header_done = True
        for rec in recs:
          print("\t".join(_row(rec, with_sd)), flush=True)
      if args.annotate:
        annotate(img, recs, os.path.join(args.annotate, _annotate_name(name, used)))
  if args.out:
    _write(args.out, records, error_list, bool(with_sd), args.checkpoint)
  return min(len(failed), MAX_FAILED_STATUS)


def _write(out: str, records: list[dict[str, Any]], errors: list[dict[str, str]], with_sd: bool,
           checkpoint: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if out.lower().endswith(".json"):
    with open(out, "w") as f:
      json.dump({"checkpoint": checkpoint, "faces": records, "errors": errors}, f, indent=1)
    return
  with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(_columns(with_sd))
    w.writerows(_row(r, with_sd) for r in records)


if __name__ == "__main__":
  sys.exit(main())
