"""The authors' published split lists: one `path label` per line (Caffe ImageData lists).

The paper's training pools and test sets are fixed files, not seeded draws: LAP `chalearn_train_80.txt`
(1981 of the 2476 training images) and `chalearn_validation.txt` (1136), MORPH 2 `2_1_train.txt` (4380)
and `2_1_test.txt` (1095, Rothe et al.'s fold, not subject-disjoint). Their paths are absolute paths on the
authors' machines, e.g. `/home/.../train/image_3178.jpg_face.jpg 37`, so an entry is matched to a dataset
record by its file name, with the `_face.jpg` suffix of Rothe et al.'s face crops removed on both sides
(`image_3178.jpg` in the list matches `train/image_3178.jpg` or `train/image_3178.jpg_face.jpg` on disk).
A name shared by several records is settled by the parent folder (val = valid = validation), else it is
an error. A listed file the dataset lacks is an error naming the list file and line; dataset files no list
names are left out and counted.

`config.data.split_lists = DIR` selects this split (agejax.experiments.study_data): DIR holds the pool and
test lists under the names of LIST_FILES for the dataset (or `pool.txt` / `test.txt` for any dataset).
"""

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from agejax.data.records import AgeRecord
from agejax.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

# (pool list, test list) per dataset, as the authors' repository names them.
LIST_FILES = {"lap": ("chalearn_train_80.txt", "chalearn_validation.txt"), "morph": ("2_1_train.txt", "2_1_test.txt")}
GENERIC_FILES = ("pool.txt", "test.txt")
_CROP_SUFFIX = "_face.jpg"
_AUG_RE = re.compile(r"_aug_\d+$")
_FOLDER_ALIASES = {"val": "valid", "validation": "valid"}
LABEL_TOLERANCE = 1.0  # years: the lists' labels are whole years, the dataset's may be vote means


@dataclasses.dataclass(frozen=True)
class ListEntry:
  """One line of a split list."""

  path: str
  label: float
  line: int


def list_key(path: str) -> str:
  """The file name an entry or a record is matched by: the base name without Rothe's `_face.jpg`."""
  name = os.path.basename(path.replace("\\", "/"))
  return name[: -len(_CROP_SUFFIX)] if name.lower().endswith(_CROP_SUFFIX) else name


def _folder(path: str) -> str:
  parent = os.path.basename(os.path.dirname(path.replace("\\", "/"))).lower()
  return _FOLDER_ALIASES.get(parent, parent)


def read_split_list(path: str) -> list[ListEntry]:
  """Entries of a `path label` list; blank lines are skipped, anything else malformed is an error."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f"{path}: cannot read the split list ({e})") from e
  entries, seen = [], {}
  for number, text in enumerate(lines, 1):
    if not text.strip():
      continue
    where = f"{path}:{number}"
    parts = text.strip().rsplit(maxsplit=1)
    file = parts[0] if len(parts) == 2 else ""
    try:
      value = float(parts[-1])
    except ValueError:
      value = None
    if not file or value is None:
      raise DatasetError(f"{where}: expected 'PATH LABEL' (a file and an age), got {text.strip()!r}")
    if _AUG_RE.search(list_key(file)):
      raise DatasetError(f"{where}: {os.path.basename(file)} is an augmented copy (_aug_N): give the base list "
                         "(e.g. chalearn_train_80.txt, 2_1_train.txt); agejax makes the rotated versions itself")
    key = list_key(file)
    if key in seen:
      raise DatasetError(f"{where}: {file} is listed twice (first at line {seen[key]})")
    seen[key] = number
    entries.append(ListEntry(file, value, number))
  if not entries:
    raise DatasetError(f"{path}: the split list is empty")
  return entries


def list_files(list_dir: str, dataset: str) -> tuple[str, str]:
  """(pool list, test list) in `list_dir` for `dataset`: the authors' names, else pool.txt / test.txt."""
  if not os.path.isdir(list_dir):
    raise ConfigError(f"config.data.split_lists={list_dir!r} is not a folder: point it at the folder holding the "
                      f"split lists ({' and '.join(LIST_FILES.get(dataset, GENERIC_FILES))})")
  for names in (LIST_FILES.get(dataset), GENERIC_FILES):
    if names and all(os.path.isfile(os.path.join(list_dir, n)) for n in names):
      return os.path.join(list_dir, names[0]), os.path.join(list_dir, names[1])
  wanted = " and ".join(LIST_FILES.get(dataset, GENERIC_FILES))
  raise ConfigError(f"config.data.split_lists={list_dir!r} lacks the {dataset} split lists: expected {wanted}"
                    + (f" (or {' and '.join(GENERIC_FILES)})" if dataset in LIST_FILES else ""))


def _index(records: Sequence[AgeRecord]) -> dict[str, list[int]]:
  index: dict[str, list[int]] = {}
  for i, r in enumerate(records):
    index.setdefault(list_key(r.path), []).append(i)
  return index


def match_entries(entries: Sequence[ListEntry], records: Sequence[AgeRecord], list_path: str,
                  index: dict[str, list[int]] | None = None) -> list[int]:
  """Index into `records` of every entry, in list order; a missing or ambiguous entry is an error."""
  index = _index(records) if index is None else index
  out = []
  for e in entries:
    found = index.get(list_key(e.path), [])
    if len(found) > 1:  # the same name in several folders: keep the one in the entry's folder
      found = [i for i in found if _folder(records[i].path) == _folder(e.path)] or found
    where = f"{list_path}:{e.line}"
    if not found:
      raise DatasetError(f"{where}: {e.path} is not among the {len(records)} usable records of the dataset "
                         f"(no file named {list_key(e.path)}[{_CROP_SUFFIX}]; missing, unreadable or rejected)")
    if len(found) > 1:
      names = ", ".join(records[i].path for i in found[:3])
      raise DatasetError(f"{where}: {e.path} matches {len(found)} records ({names}): keep one in the dataset")
    out.append(found[0])
  return out


def split_from_lists(records: Sequence[AgeRecord], list_dir: str, dataset: str) -> tuple[list[int], list[int], dict]:
  """(pool indices, test indices, info) of `records` from the published lists in `list_dir`."""
  pool_path, test_path = list_files(list_dir, dataset)
  index = _index(records)
  pool_entries, test_entries = read_split_list(pool_path), read_split_list(test_path)
  pool = match_entries(pool_entries, records, pool_path, index)
  test = match_entries(test_entries, records, test_path, index)
  both = set(pool) & set(test)
  if both:
    i = min(both)
    raise DatasetError(f"{records[i].path} is in both {pool_path} and {test_path}")
  disagree = [(f"{path}:{e.line}", e.label, records[i].age)
              for path, entries, idx in ((pool_path, pool_entries, pool), (test_path, test_entries, test))
              for e, i in zip(entries, idx, strict=True) if abs(e.label - records[i].age) > LABEL_TOLERANCE]
  if disagree:
    log.warning("split lists: %d entries whose label differs from the dataset's age by more than %.0f year(s), e.g. "
                "%s (list %g, dataset %g); the dataset's ages are used", len(disagree), LABEL_TOLERANCE,
                *disagree[0])
  unlisted = len(records) - len(pool) - len(test)
  log.info("split lists: pool %d (%s), test %d (%s); %d dataset records in neither list, left out", len(pool),
           os.path.basename(pool_path), len(test), os.path.basename(test_path), unlisted)
  info: dict[str, Any] = {"split": "published lists", "pool_list": pool_path, "test_list": test_path,
                          "pool_listed": len(pool), "test_listed": len(test), "unlisted_records": unlisted,
                          "label_disagreements": len(disagree),
                          "label_disagreement_examples": [list(d) for d in disagree[:5]]}
  return pool, test, info
