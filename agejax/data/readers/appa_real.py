"""APPA-REAL: `gt_avg_{split}.csv` (file_name, num_ratings, apparent_age_avg, apparent_age_std, real_age).

Crops live at `{split}/{file_name}_face.jpg`; the uncropped `{split}/{file_name}` is the fallback.
`label='apparent'` gives the vote mean and SD, `label='real'` the real age (the other kept in `extra`).
"""

import os

from agejax.data.readers.common import check_root, csv_rows, finish, first_existing, parse_float, register, valid_age
from agejax.data.records import AgeRecord, Dataset, Rejections
from agejax.errors import DatasetError

SPLITS = ("train", "valid", "test")
_NEEDED = ("file_name", "apparent_age_avg", "apparent_age_std", "real_age")


@register("appa_real", "appa")
def read_appa_real(root: str, policy: str = "skip", label: str = "apparent", splits: tuple[str, ...] = SPLITS,
                   prefer_crops: bool = True, min_age: float = 0, max_age: float = 120) -> Dataset:
  """Reads the splits whose `gt_avg_{split}.csv` exists in `root`."""
  if label not in ("apparent", "real"):
    raise ValueError(f"label must be 'apparent' or 'real', got {label!r}")
  root = check_root(root)
  found = [s for s in splits if os.path.isfile(os.path.join(root, f"gt_avg_{s}.csv"))]
  if not found:
    raise DatasetError(f"{root}: none of {[f'gt_avg_{s}.csv' for s in splits]} found")
  rej = Rejections(policy)
  records = []
  for split in found:
    records += _read_split(root, split, rej, label, prefer_crops, min_age, max_age)
  return finish("appa_real", root, records, rej)


def _read_split(root, split, rej, label, prefer_crops, min_age, max_age) -> list[AgeRecord]:
  records = []
  for where, row in csv_rows(os.path.join(root, f"gt_avg_{split}.csv"), rej, _NEEDED)[1]:
    file_name = row["file_name"]
    avg, std, real = (parse_float(row[c]) for c in _NEEDED[1:])
    if avg is None or std is None or real is None:
      rej.reject(where, "malformed row (age field not a number)")
      continue
    age, age_std = (avg, std) if label == "apparent" else (real, None)
    if not valid_age(age, rej, where, min_age, max_age):
      continue
    folder = os.path.join(root, split)
    names = [file_name + "_face.jpg", file_name] if prefer_crops else [file_name, file_name + "_face.jpg"]
    img = first_existing([os.path.join(folder, n) for n in names])
    if img is None:
      rej.reject(f"{where} ({file_name})", "missing file")
      continue
    extra = {"apparent_age_avg": avg, "apparent_age_std": std, "real_age": real}
    if "num_ratings" in row:
      extra["num_ratings"] = parse_float(row["num_ratings"])
    records.append(AgeRecord(path=img, age=age, age_std=age_std, split=split, source=where, extra=extra))
  return records
