"""MORPH 2 (Album 2): protocol CSV(s) with an `age` and `photo` column, or the folder's file names alone.

File names follow `{id:6}_{n}{M|F}{age:2}.JPG`; with a CSV its `gender` column is trusted over the letter in
the name (disagreements are reported as warnings). Dates are MM/DD/YYYY.
"""

import datetime
import os
import re

from agejax.data.readers.common import (
  check_root,
  csv_files,
  csv_rows,
  csv_table,
  finish,
  gender_code,
  named_images,
  parse_float,
  register,
  split_from_name,
  valid_age,
  warn,
)
from agejax.data.records import AgeRecord, Dataset, Rejections

NAME_RE = re.compile(r"(\d{6})_(\d{1,2})([MF])(\d{2})\.JPG", re.IGNORECASE)
REQUIRED = ("photo", "age")


def parse_date(text: str) -> str | None:
  """ISO date from MM/DD/YYYY, or None."""
  try:
    return datetime.datetime.strptime(text.strip(), "%m/%d/%Y").date().isoformat()
  except ValueError:
    return None


@register("morph", "morph2")
def read_morph(root: str, policy: str = "skip", csv: str | list[str] | None = None, min_age: float = 0,
               max_age: float = 120) -> Dataset:
  """Reads the protocol CSV(s) in `root` (those with `photo` and `age` columns), else parses file names."""
  root = check_root(root)
  rej = Rejections(policy)
  if csv is None:
    paths = [p for p in csv_files(root) if set(REQUIRED) <= set(csv_table(p)[0])]
  else:
    paths = [csv] if isinstance(csv, str) else list(csv)
  if paths:
    records = [r for p in paths for r in _read_csv(p, root, rej, min_age, max_age)]
  else:
    records = _read_names(root, rej, min_age, max_age)
  return finish("morph", root, records, rej)


def _read_csv(path, root, rej, min_age, max_age) -> list[AgeRecord]:
  split = split_from_name(path)
  records = []
  for where, row in csv_rows(path, rej, REQUIRED)[1]:
    photo, age = row["photo"], parse_float(row["age"])
    m = NAME_RE.search(os.path.basename(photo))
    if age is None or m is None:
      rej.reject(where, "malformed row (age not a number or photo name not like 092796_0M43.JPG)")
      continue
    if not valid_age(age, rej, where, min_age, max_age):
      continue
    img = os.path.join(root, photo)
    if not os.path.isfile(img):
      rej.reject(f"{where} ({photo})", "missing file")
      continue
    gender = gender_code(row.get("gender", "")) or m.group(3).upper()
    if gender != m.group(3).upper():
      warn(rej, where, "gender column disagrees with the file name (column kept)")
    extra = {"dob": parse_date(row.get("dob", "")), "doa": parse_date(row.get("doa", "")),
             "race": row.get("race") or None, "picture_num": row.get("picture_num") or m.group(2)}
    subject = row.get("id_num") or m.group(1)
    records.append(AgeRecord(path=img, age=age, gender=gender, subject=subject.zfill(6), split=split, source=where,
                             extra=extra))
  return records


def _read_names(root, rej, min_age, max_age) -> list[AgeRecord]:
  records = []
  for path, name, m in named_images(root, rej, NAME_RE.fullmatch, "092796_0M43.JPG"):
    age = float(m.group(4))
    if not valid_age(age, rej, path, min_age, max_age):
      continue
    records.append(AgeRecord(path=path, age=age, gender=m.group(3).upper(), subject=m.group(1), source=name,
                             extra={"picture_num": m.group(2)}))
  return records
