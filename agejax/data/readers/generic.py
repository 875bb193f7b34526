"""Generic CSV: a header with `path` and `age` (optional `age_std`, `split`, `subject`, `gender`),
paths relative to the CSV's folder (or absolute)."""

import os

from agejax.data.readers.common import (
  check_root,
  csv_files,
  csv_rows,
  finish,
  gender_code,
  parse_float,
  register,
  require_columns,
  valid_age,
)
from agejax.data.records import AgeRecord, Dataset, Rejections
from agejax.errors import DatasetError

REQUIRED = ("path", "age")
MISSING_SHOWN = 3  # missing image paths named in the 'no image found' error


def check_header(header: list[str], csv: str) -> None:
  """Raises DatasetError naming the missing required columns and the columns found."""
  require_columns(header, REQUIRED, csv)


@register("csv", "generic")
def read_generic(root: str, policy: str = "skip", csv: str | None = None, min_age: float = 0,
                 max_age: float = 120, strict_ages: bool = False) -> Dataset:
  """`root` is the CSV itself (images beside it) or a folder holding exactly one CSV, or pass `csv=`.

  `strict_ages`: a row whose age (or age_std) is not a number stops the read naming file:line, whatever the
  policy (a wrong column or a range like '25-32' is a mistake to fix, not an image to drop). When no listed
  image exists, the error names the first few missing paths and the count.
  """
  root = check_root(root)
  if csv is None and os.path.isfile(root):
    csv, root = root, os.path.dirname(root)
  elif csv is None:
    found = csv_files(root)
    if len(found) != 1:
      raise DatasetError(f"{root}: expected one CSV, found {len(found)}; pass csv=...")
    csv = found[0]
  rej = Rejections(policy)
  records, missing = [], []
  for where, row in csv_rows(csv, rej, REQUIRED)[1]:
    age, std_text = parse_float(row["age"]), row.get("age_std", "")
    std = parse_float(std_text) if std_text else None
    if age is None or (std_text and std is None):
      if strict_ages:
        bad = ("age", row["age"]) if age is None else ("age_std", std_text)
        line = where.rpartition(":")[2]
        raise DatasetError(f"{csv}:{line}: {bad[0]} {bad[1]!r} is not a number")
      rej.reject(where, "malformed row (age or age_std not a number)")
      continue
    if not valid_age(age, rej, where, min_age, max_age):
      continue
    img = os.path.join(root, row["path"])
    if not os.path.isfile(img):
      missing.append(row["path"])
      rej.reject(f"{where} ({row['path']})", "missing file")
      continue
    split = row.get("split", "").lower() or None
    records.append(AgeRecord(path=img, age=age, age_std=std, gender=gender_code(row.get("gender", "")),
                             subject=row.get("subject") or None, split=split, source=where))
  if not records and missing:
    shown = ", ".join(missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
    raise DatasetError(f"{csv}: no image found: all {len(missing)} listed paths are missing (relative paths "
                       f"resolve against {root}): {shown}")
  return finish("csv", root, records, rej)
