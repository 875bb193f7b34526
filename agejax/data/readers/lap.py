"""ChaLearn LAP 2015/2016 apparent age: ground-truth CSVs (image, mean, SD of the votes) plus image folders.

The delimiter (',' or ';') and the header row vary between releases, so both are detected. The split comes
from the CSV name (`train_gt.csv`, `Reference_valid.csv`, ...); images are looked up in the given folder, the
split's folder (`train/`, `valid/`, `test/`) or the root, preferring a `X.jpg_face.jpg` crop when present.
"""

import os

from agejax.data.readers.common import (
  check_root,
  csv_files,
  finish,
  first_existing,
  numbered_rows,
  parse_float,
  register,
  split_from_name,
  valid_age,
)
from agejax.data.records import AgeRecord, Dataset, Rejections
from agejax.errors import DatasetError

_SPLIT_DIRS = {"train": ("train", "Train"), "valid": ("valid", "val", "Valid", "validation"), "test": ("test", "Test")}


def _has_header(cells: list[str]) -> bool:
  return len(cells) >= 2 and parse_float(cells[1]) is None


def image_candidates(root: str, name: str, split: str | None, images: str | None, prefer_crops: bool) -> list[str]:
  """Paths to try for image `name`, crops first when `prefer_crops`."""
  folders = [images] if images else []
  folders += [os.path.join(root, d) for d in _SPLIT_DIRS.get(split or "", ())] + [root]
  names = [name + "_face.jpg", name] if prefer_crops else [name, name + "_face.jpg"]
  return [os.path.join(f, n) for f in folders for n in names]


@register("lap", "chalearn", "lap2015", "lap2016")
def read_lap(root: str, policy: str = "skip", csv: str | list[str] | None = None, images: str | None = None,
             split: str | None = None, prefer_crops: bool = True, min_age: float = 0, max_age: float = 120) -> Dataset:
  """Reads LAP ground truth; by default every CSV in `root` whose name names a split."""
  root = check_root(root)
  if csv is None:
    paths = [p for p in csv_files(root) if split_from_name(p)]
    if not paths:
      raise DatasetError(f"{root}: no ground-truth CSV named for a split (train/valid/test); pass csv=...")
  else:
    paths = [csv] if isinstance(csv, str) else list(csv)
  rej = Rejections(policy)
  records = []
  for path in paths:
    records += _read_gt(path, root, rej, split or split_from_name(path), images, prefer_crops, min_age, max_age)
  return finish("lap", root, records, rej)


def _read_gt(path, root, rej, split, images, prefer_crops, min_age, max_age) -> list[AgeRecord]:
  name = os.path.basename(path)
  records = []
  for line, cells in numbered_rows(path):
    if line == 1 and _has_header(cells):
      continue
    where = f"{name}:{line}"
    if len(cells) < 3 or not cells[0]:
      rej.reject(where, "malformed row (need image, mean, std)")
      continue
    mean, std = parse_float(cells[1]), parse_float(cells[2])
    if mean is None or std is None:
      rej.reject(where, "malformed row (mean or std not a number)")
      continue
    if std < 0:
      rej.reject(where, "negative std")
      continue
    if not valid_age(mean, rej, where, min_age, max_age):
      continue
    img = first_existing(image_candidates(root, cells[0], split, images, prefer_crops))
    if img is None:
      rej.reject(f"{where} ({cells[0]})", "missing file")
      continue
    records.append(AgeRecord(path=img, age=mean, age_std=std, split=split, source=where,
                             extra={"image": cells[0]}))
  return records
