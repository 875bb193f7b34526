"""Generic CSV: a header with `path` and `age` (optional `age_std`, `split`, `subject`, `gender`),
paths relative to the image root."""

import os

from agejax.data.readers.common import (
  check_root,
  csv_files,
  csv_table,
  finish,
  gender_code,
  parse_float,
  register,
  valid_age,
)
from agejax.data.records import AgeRecord, Dataset, Rejections
from agejax.errors import DatasetError


@register("csv", "generic")
def read_generic(root: str, policy: str = "skip", csv: str | None = None, min_age: float = 0,
                 max_age: float = 120) -> Dataset:
  """`root` is the CSV itself (images beside it) or a folder holding exactly one CSV, or pass `csv=`."""
  root = check_root(root)
  if csv is None and os.path.isfile(root):
    csv, root = root, os.path.dirname(root)
  elif csv is None:
    found = csv_files(root)
    if len(found) != 1:
      raise DatasetError(f"{root}: expected one CSV, found {len(found)}; pass csv=...")
    csv = found[0]
  header, rows = csv_table(csv)
  if not {"path", "age"} <= set(header):
    raise DatasetError(f"{csv}: header {header} must contain 'path' and 'age'")
  idx = {h: j for j, h in enumerate(header)}
  name = os.path.basename(csv)
  rej = Rejections(policy)
  records = []
  for line, cells in rows:
    where = f"{name}:{line}"
    if len(cells) < len(header):
      rej.reject(where, f"malformed row ({len(cells)} of {len(header)} columns)")
      continue
    row = {h: cells[j].strip() for h, j in idx.items()}
    age, std_text = parse_float(row["age"]), row.get("age_std", "")
    std = parse_float(std_text) if std_text else None
    if age is None or (std_text and std is None):
      rej.reject(where, "malformed row (age or age_std not a number)")
      continue
    if not valid_age(age, rej, where, min_age, max_age):
      continue
    img = os.path.join(root, row["path"])
    if not os.path.isfile(img):
      rej.reject(f"{where} ({row['path']})", "missing file")
      continue
    records.append(AgeRecord(path=img, age=age, age_std=std, gender=gender_code(row.get("gender", "")),
                             subject=row.get("subject") or None, split=row.get("split") or None, source=where))
  return finish("csv", root, records, rej)
