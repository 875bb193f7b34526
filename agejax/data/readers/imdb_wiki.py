"""IMDB-WIKI: the original `imdb.mat` / `wiki.mat` metadata, or the cleaned CSV variants seen in the wild.

Age follows the dataset's rule: the photo is assumed taken on 1 July of `photo_taken`, so
`age = taken - birth.year - (birth.month >= 7)`, with birth = `date.fromordinal(int(dob) - 366)`
(MATLAB datenums count from year 0). Cleaning steps are options and every drop is counted by reason.
"""

import datetime
import math
import os

import numpy as np

from agejax.data.readers.common import (
  check_root,
  csv_files,
  csv_rows,
  finish,
  gender_code,
  parse_float,
  register,
  split_from_name,
  valid_age,
)
from agejax.data.records import AgeRecord, Dataset, Rejections
from agejax.errors import DatasetError

MAT_GENDER = {"0": "F", "1": "M"}  # imdb.mat: 0 female, 1 male


def age_from_dob(dob: float, taken: float) -> float | None:
  """Age under the 1 July convention, or None for a bogus datenum or year."""
  try:
    birth = datetime.date.fromordinal(max(int(dob) - 366, 1))
    return float(int(taken) - birth.year - (1 if birth.month >= 7 else 0))
  except (ValueError, OverflowError, TypeError):
    return None


def _cell_str(x) -> str:
  """A MATLAB cell element as a str ('' for an empty cell)."""
  x = np.asarray(x)
  if x.size == 0:
    return ""
  return str(x.ravel()[0])


def _find_source(root: str, csv: str | None) -> tuple[str, str]:
  """(metadata file, image folder) from a folder, a .mat or a .csv path."""
  if csv:
    return csv, os.path.dirname(root) if os.path.isfile(root) else root
  if os.path.isfile(root):
    return root, os.path.dirname(root)
  for name in ("imdb.mat", "wiki.mat"):
    if os.path.isfile(os.path.join(root, name)):
      return os.path.join(root, name), root
  csvs = csv_files(root)
  if len(csvs) == 1:
    return csvs[0], root
  raise DatasetError(f"{root}: no imdb.mat or wiki.mat, and {len(csvs)} CSV files (pass csv=...)")


def _kept_image(image_root: str, rel: str, age: float, rej: Rejections, where: str, where_file: str,
                min_age: float, max_age: float, check_files: bool) -> str | None:
  """The image's path when `age` is in range and (under `check_files`) the file exists; else None, rejected."""
  if not valid_age(age, rej, where, min_age, max_age):
    return None
  img = os.path.join(image_root, rel)
  if check_files and not os.path.isfile(img):
    rej.reject(where_file, "missing file")
    return None
  return img


@register("imdb_wiki", "imdb", "wiki", "imdb_clean")
def read_imdb_wiki(root: str, policy: str = "skip", csv: str | None = None, face_score_min: float | None = 1.0,
                   require_single_face: bool = True, min_age: float = 0, max_age: float = 100,
                   require_gender: bool = True, check_files: bool = True) -> Dataset:
  """Reads IMDB-WIKI metadata; `face_score_min=None` keeps every detected face."""
  root = check_root(root)
  meta, image_root = _find_source(root, csv)
  rej = Rejections(policy)
  opts = dict(face_score_min=face_score_min, require_single_face=require_single_face, min_age=min_age,
              max_age=max_age, require_gender=require_gender, check_files=check_files)
  if meta.lower().endswith(".mat"):
    records = _read_mat(meta, image_root, rej, **opts)
  else:
    records = _read_csv(meta, image_root, rej, **opts)
  return finish(os.path.splitext(os.path.basename(meta))[0], image_root, records, rej)


def _read_mat(path: str, image_root: str, rej: Rejections, face_score_min, require_single_face, min_age, max_age,
              require_gender, check_files) -> list[AgeRecord]:
  from scipy.io import loadmat

  mat = loadmat(path)
  key = next((k for k in ("imdb", "wiki") if k in mat), None)
  if key is None:
    raise DatasetError(f"{path}: no 'imdb' or 'wiki' struct (keys: {sorted(k for k in mat if not k.startswith('__'))})")
  s = mat[key][0, 0]
  fields = s.dtype.names
  for need in ("dob", "photo_taken", "full_path", "gender", "face_score", "second_face_score"):
    if need not in fields:
      raise DatasetError(f"{path}: struct '{key}' lacks field '{need}'")
  col = {f: s[f][0] if s[f].ndim == 2 and s[f].shape[0] == 1 else s[f].ravel() for f in fields}
  n = len(col["full_path"])
  name = os.path.basename(path)
  records = []
  for i in range(n):
    where = f"{name}:row {i + 1}"
    rel = _cell_str(col["full_path"][i])
    where_full = f"{where} ({rel})"
    score = float(col["face_score"][i])
    if math.isinf(score) and score < 0:
      rej.reject(where_full, "no face found (face_score -inf)")
      continue
    if face_score_min is not None and not score >= face_score_min:
      rej.reject(where_full, f"face_score below {face_score_min:g}")
      continue
    second = float(col["second_face_score"][i])
    if require_single_face and not math.isnan(second):
      rej.reject(where_full, "second face present")
      continue
    g = float(col["gender"][i])
    gender = None if math.isnan(g) else MAT_GENDER.get(str(int(g)))
    if require_gender and gender is None:
      rej.reject(where_full, "unknown gender")
      continue
    age = age_from_dob(float(col["dob"][i]), float(col["photo_taken"][i]))
    if age is None:
      rej.reject(where_full, "bogus dob or photo_taken")
      continue
    img = _kept_image(image_root, rel, age, rej, where_full, where_full, min_age, max_age, check_files)
    if img is None:
      continue
    extra = {"face_score": score, "second_face_score": second, "dob": float(col["dob"][i]),
             "photo_taken": int(col["photo_taken"][i])}
    if "face_location" in col:
      extra["face_location"] = [float(v) for v in np.asarray(col["face_location"][i]).ravel()]
    if "name" in col:
      extra["name"] = _cell_str(col["name"][i])
    subject = None
    if "celeb_id" in col:
      subject = str(int(col["celeb_id"][i]))
    records.append(AgeRecord(path=img, age=age, gender=gender, subject=subject, source=where, extra=extra))
  return records


def _read_csv(path: str, image_root: str, rej: Rejections, face_score_min, require_single_face, min_age, max_age,
              require_gender, check_files) -> list[AgeRecord]:
  """Cleaned variants: `genders,ages,img_paths` or IMDB-Clean `filename,age,gender,x_min,...`."""
  header, rows = csv_rows(path, rej)
  if {"genders", "ages", "img_paths"} <= set(header):
    path_col, age_col, gender_col = "img_paths", "ages", "genders"
  elif {"filename", "age"} <= set(header):
    path_col, age_col, gender_col = "filename", "age", "gender"
  else:
    raise DatasetError(f"{path}: header {header} is neither 'genders,ages,img_paths' nor 'filename,age,gender,...'")
  box = [c for c in ("x_min", "y_min", "x_max", "y_max") if c in header]
  split = split_from_name(path)
  records = []
  for where, row in rows:
    rel, age = row[path_col], parse_float(row[age_col])
    if age is None:
      rej.reject(where, "malformed row (age not a number)")
      continue
    gender = gender_code(row[gender_col], MAT_GENDER) if gender_col in row else None
    if require_gender and gender is None:
      rej.reject(where, "unknown gender")
      continue
    img = _kept_image(image_root, rel, age, rej, where, f"{where} ({rel})", min_age, max_age, check_files)
    if img is None:
      continue
    extra = {}
    if len(box) == 4:
      extra["face_box"] = [parse_float(row[c]) for c in box]
    records.append(AgeRecord(path=img, age=age, gender=gender, split=split, source=where, extra=extra))
  return records
