"""Detection rates behind agejax.data.faces (docs/faces.md): dlib HOG and CNN vs OpenCV Haar cascades.

  python docs/faces_eval.py --root /path/to/UTKFace [--detectors hog0,hog1,cnn0,haar,haar_alt2] [--json OUT]

Two test sets, both seeded: 500 UTKFace chips as they are (200x200, one face each), and 200 full-size photos:
scikit-image's `astronaut` (one face, box marked by hand) and 199 canvases (480x640 to 720x960) holding 1-3
other UTKFace chips scaled to 60-260 px, pasted on scikit-image's face-free pictures or noise, a quarter of the
single-face ones padded out with the chip's own border instead. A detection finds a face when its centre lies
in the middle 60% of the pasted chip and its width is 0.25-1.1 of the chip's; detections that find no face are
false positives. Also measures the dlib chip padding that maps a UTKFace chip onto itself (faces.CHIP_PADDING).
Needs opencv-python-headless<5 for the Haar cascades (OpenCV 5's wheels no longer ship them).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from agejax.data import faces as F  # noqa: E402
from agejax.data.images import decode_image  # noqa: E402

BACKGROUNDS = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
               "moon", "coins", "colorwheel", "clock", "retina", "cell")
ASTRONAUT_BOX = (175, 76, 266, 167)  # the face, marked by hand (left, top, right, bottom)


def _rgb(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype == bool:
    a = a.astype(np.uint8) * 255
  if a.ndim == 2:
    a = np.stack([a] * 3, -1)
  return a[..., :3].astype(np.uint8)


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
  return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR))


def make_photos(chip_paths: list[str], rng: np.random.Generator, n: int = 199) -> list[tuple[np.ndarray, list]]:
  """(image, face boxes) pairs: the canvases described in the module docstring, astronaut first."""
  photos = [(skimage.data.astronaut(), [ASTRONAUT_BOX])]
  bgs = [_rgb(getattr(skimage.data, name)()) for name in BACKGROUNDS]
  next_chip = iter(chip_paths)
  for _ in range(n):
    h, w = [(480, 640), (600, 800), (720, 960)][rng.integers(3)]
    k = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    if k == 1 and rng.random() < 0.25:  # one chip padded out with its own border
      s = int(rng.integers(80, 261))
      chip = _resize(decode_image(next(next_chip)), s, s)
      x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
      canvas = np.pad(chip, ((y, h - s - y), (x, w - s - x), (0, 0)), mode="edge")
      photos.append((canvas, [(x, y, x + s, y + s)]))
      continue
    if rng.random() < 0.15:
      canvas = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
      canvas = _resize(bgs[rng.integers(len(bgs))], w, h).copy()
    boxes = []
    for _ in range(k):
      s = int(rng.integers(60, 261))
      for _ in range(100):  # rejection sampling: no overlap between chips
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        if all(x + s <= b[0] or b[2] <= x or y + s <= b[1] or b[3] <= y for b in boxes):
          break
      else:
        continue
      canvas[y:y + s, x:x + s] = _resize(decode_image(next(next_chip)), s, s)
      boxes.append((x, y, x + s, y + s))
    photos.append((canvas, boxes))
  return photos


def _matches(det: tuple, gt: tuple) -> bool:
  s = gt[2] - gt[0]
  cx, cy, dw = (det[0] + det[2]) / 2, (det[1] + det[3]) / 2, det[2] - det[0]
  return (gt[0] + 0.2 * s <= cx <= gt[2] - 0.2 * s and gt[1] + 0.2 * s <= cy <= gt[3] - 0.2 * s
          and 0.25 * s <= dw <= 1.1 * s)


def score_photo(dets: list[tuple], gts: list[tuple]) -> tuple[int, int]:
  """(faces found, false positives), each ground-truth face matched at most once."""
  free, found = list(gts), 0
  fp = 0
  for d in dets:
    hit = next((g for g in free if _matches(d, g)), None)
    if hit is None:
      fp += 1
    else:
      free.remove(hit)
      found += 1
  return found, fp


def detector_fn(name: str):
  """A function image -> list of boxes (left, top, right, bottom) for each detector under test."""
  if name.startswith("hog") or name.startswith("cnn"):
    det = F.FaceDetector(name=name[:3], upsample=int(name[3]), min_score=float(name[5:] or 0) if "@" in name else
                         0.0)
    return lambda img: [f.box for f in det(img)]
  import cv2
  files = {"haar": "haarcascade_frontalface_default.xml", "haar_alt2": "haarcascade_frontalface_alt2.xml"}
  cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, files[name]))

  def run(img):
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    found = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(30, 30))
    return [(x, y, x + w, y + h) for x, y, w, h in (found if len(found) else [])]
  return run


def chip_padding(chips: list[np.ndarray]) -> dict:
  """The get_face_chip padding whose chip rectangle is the whole 200x200 UTKFace chip (median over chips)."""
  import dlib
  det = F.FaceDetector()
  pads, offsets = [], []
  for img in chips:
    found = det(img)
    if not found:
      continue
    pts = [dlib.point(round(x), round(y)) for x, y in found[0].landmarks]
    shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), pts)
    r = dlib.get_face_chip_details(shape, 200, 0.0).rect
    pads.append((img.shape[1] / r.width() - 1) / 2)
    c = r.center()
    offsets.append((c.x - img.shape[1] / 2, c.y - img.shape[0] / 2))
  o = np.asarray(offsets)
  return {"n": len(pads), "median_padding": float(np.median(pads)), "iqr": [float(np.percentile(pads, 25)),
          float(np.percentile(pads, 75))], "median_centre_offset_px": [float(np.median(o[:, 0])),
                                                                        float(np.median(o[:, 1]))]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", required=True)
  p.add_argument("--detectors", default="hog0,hog1,cnn0,haar,haar_alt2")
  p.add_argument("--json")
  args = p.parse_args()
  names = sorted(f for f in os.listdir(args.root) if f.lower().endswith((".jpg", ".jpeg", ".png")))
  rng = np.random.default_rng(0)
  order = rng.permutation(len(names))
  chip_paths = [os.path.join(args.root, names[i]) for i in order[:500]]
  canvas_paths = [os.path.join(args.root, names[i]) for i in order[500:1200]]
  chips = [decode_image(q) for q in chip_paths]
  photos = make_photos(canvas_paths, np.random.default_rng(1))
  n_faces = sum(len(b) for _, b in photos)
  report = {"chips": len(chips), "photos": len(photos), "photo_faces": n_faces,
            "chip_padding": chip_padding(chips), "detectors": {}}
  print(json.dumps({k: report[k] for k in ("chips", "photos", "photo_faces", "chip_padding")}), flush=True)
  for name in args.detectors.split(","):
    fn = detector_fn(name)
    t = time.perf_counter()
    chip_hits = sum(1 for img in chips if any(score_photo([d], [(0, 0, 200, 200)])[0] for d in fn(img)))
    t_chip = (time.perf_counter() - t) / len(chips)
    t = time.perf_counter()
    found = fp = all_found = 0
    astronaut = None
    for j, (img, gts) in enumerate(photos):
      f, e = score_photo(fn(img), gts)
      found, fp, all_found = found + f, fp + e, all_found + (f == len(gts))
      if j == 0:
        astronaut = {"found": f, "false_positives": e}
    t_photo = (time.perf_counter() - t) / len(photos)
    r = {"chip_rate": chip_hits / len(chips), "photo_recall": found / n_faces, "photos_all_found": all_found,
         "false_positives": fp, "astronaut": astronaut, "s_per_chip": round(t_chip, 4),
         "s_per_photo": round(t_photo, 4)}
    report["detectors"][name] = r
    print(name, json.dumps(r), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
