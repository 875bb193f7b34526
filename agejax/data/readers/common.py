"""Shared pieces of the readers: the format registry, age checks, file lookup and the one CSV row loop."""

import csv
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from agejax.data.records import WARNING, Dataset, Rejections

T = TypeVar("T")

Reader = Callable[..., Dataset]
REGISTRY: dict[str, Reader] = {}

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Files a dataset folder commonly carries besides its images; anything else unparsable is rejected.
NON_IMAGE_EXTS = (".txt", ".csv", ".json", ".md", ".mat", ".db", ".ini", ".zip", ".tar", ".gz", ".tgz", ".npz",
                  ".npy", ".pkl", ".py", ".html", ".xml", ".yaml", ".yml", ".log", ".pdf")


def register(*names: str) -> Callable[[Reader], Reader]:
  """Registers a reader function under one or more format names."""

  def wrap(fn: Reader) -> Reader:
    for n in names:
      REGISTRY[n] = fn
    return fn

  return wrap


def warn(rej: Rejections, where: str, reason: str) -> None:
  """Counts a kept-but-suspicious input in the report without raising under 'strict'."""
  rej.flag(where, WARNING + reason)


def valid_age(age: float, rej: Rejections, where: str, min_age: float, max_age: float) -> bool:
  """True if `age` is finite and within [min_age, max_age]; otherwise rejects it under the policy."""
  if age is None or not math.isfinite(age):
    rej.reject(where, "age is not a finite number")
    return False
  if age < 0:
    rej.reject(where, "negative age")
    return False
  if not min_age <= age <= max_age:
    rej.reject(where, f"age outside [{min_age:g}, {max_age:g}]")
    return False
  return True


def parse_float(text: str) -> float | None:
  try:
    return float(text.strip())
  except (ValueError, AttributeError):
    return None


def is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTS)


def clearly_not_image(name: str) -> bool:
  """Hidden files, OS droppings and known non-image extensions: skipped without a report."""
  low = name.lower()
  return name.startswith(".") or low in ("thumbs.db", "desktop.ini") or low.endswith(NON_IMAGE_EXTS)


def walk_files(root: str) -> Iterator[str]:
  """Absolute paths of all files under `root`, in sorted order (deterministic across machines)."""
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for f in sorted(filenames):
      yield os.path.join(os.path.abspath(dirpath), f)


def walk_images(root: str) -> Iterator[tuple[str, str]]:
  """(absolute path, file name) of every image file under `root`, in sorted order."""
  for path in walk_files(root):
    name = os.path.basename(path)
    if is_image_name(name) and not clearly_not_image(name):
      yield path, name


def named_images(root: str, rej: Rejections, parse: Callable[[str], T | None],
                 example: str) -> Iterator[tuple[str, str, T]]:
  """(path, name, parse(name)) of every image under `root`; a name `parse` refuses (None) is rejected."""
  for path, name in walk_images(root):
    parsed = parse(name)
    if parsed is None:
      rej.reject(path, f"file name not like {example}")
      continue
    yield path, name, parsed


def first_existing(candidates: list[str]) -> str | None:
  for c in candidates:
    if os.path.isfile(c):
      return c
  return None


def read_text(path: str) -> str:
  """The file's text: a UTF-8 BOM dropped, undecodable bytes replaced, line endings kept for the csv module."""
  with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
    return f.read()


def sniff_rows(text: str, delimiters: str = ",;\t") -> list[list[str]]:
  """Splits CSV text with whichever of `delimiters` the first non-empty line uses most."""
  first = next((ln for ln in text.splitlines() if ln.strip()), "")
  delim = max(delimiters, key=first.count) if first else ","
  return [row for row in csv.reader(io.StringIO(text), delimiter=delim)]


def check_root(root: str) -> str:
  from agejax.errors import DatasetError

  if not os.path.exists(root):
    raise DatasetError(f"{root}: dataset root does not exist")
  return os.path.abspath(root)


def finish(name: str, root: str, records: list, rej: Rejections) -> Dataset:
  """Builds the Dataset with records sorted by path (stable, so equal paths keep file order)."""
  return Dataset(name=name, root=root, records=sorted(records, key=lambda r: r.path), rejections=rej)


def numbered_rows(path: str) -> Iterator[tuple[int, list[str]]]:
  """(line number, stripped cells) of every non-blank row of the CSV at `path`, delimiter sniffed."""
  for i, row in enumerate(sniff_rows(read_text(path))):
    cells = [c.strip() for c in row]
    if any(cells):
      yield i + 1, cells


def csv_table(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
  """(lower-cased header, [(line number, cells)]) of a CSV with a header row; blank lines dropped."""
  numbered = list(numbered_rows(path))
  if not numbered:
    return [], []
  return [c.lower() for c in numbered[0][1]], numbered[1:]


def _listed(names: Sequence[str]) -> str:
  """The names quoted and joined as in prose: 'a', 'b' and 'c'."""
  quoted = [repr(n) for n in names]
  return " and ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def require_columns(header: list[str], required: Sequence[str], path: str) -> None:
  """Raises DatasetError naming the file, the missing required columns and the columns found."""
  from agejax.errors import DatasetError

  missing = [c for c in required if c not in header]
  if missing:
    found = ", ".join(h for h in header if h) or "none (empty file)"
    raise DatasetError(f"{path}: header must contain {_listed(required)}; missing {' and '.join(map(repr, missing))} "
                       f"(columns found: {found})")


def csv_rows(path: str, rej: Rejections,
             required: Sequence[str] = ()) -> tuple[list[str], Iterator[tuple[str, dict[str, str]]]]:
  """(header, rows) of a CSV with a header row: rows are ('file:line', {column: stripped cell}), read lazily.

  The header must hold `required` (else DatasetError); a row with fewer cells than the header is rejected as
  malformed under `rej`'s policy, in file order with the reader's own checks.
  """
  header, numbered = csv_table(path)
  require_columns(header, required, path)
  name = os.path.basename(path)

  def rows() -> Iterator[tuple[str, dict[str, str]]]:
    for line, cells in numbered:
      where = f"{name}:{line}"
      if len(cells) < len(header):
        rej.reject(where, f"malformed row ({len(cells)} of {len(header)} columns)")
        continue
      yield where, dict(zip(header, cells))  # a repeated column name keeps its last cell

  return header, rows()


def csv_files(root: str) -> list[str]:
  return sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(".csv"))


def split_from_name(name: str) -> str | None:
  """'train' / 'valid' / 'test' when the file or folder name says so."""
  low = os.path.basename(name).lower()
  for key, split in (("train", "train"), ("valid", "valid"), ("val", "valid"), ("test", "test")):
    if key in low:
      return split
  return None


def gender_code(text: str, numeric: dict[str, str] | None = None) -> str | None:
  """'M'/'F' from letters or words; digits through `numeric` (datasets disagree on 0/1)."""
  t = text.strip().lower()
  if t in ("m", "male", "man"):
    return "M"
  if t in ("f", "female", "woman"):
    return "F"
  if numeric:
    try:
      return numeric.get(str(int(float(t))))
    except ValueError:
      return None
  return None
