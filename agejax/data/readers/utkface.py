"""UTKFace: labels in the file name, `[age]_[gender]_[race]_[datetime].jpg[.chip.jpg]`.

The real folder has lenient cases that keep their labels and are reported as warnings: 3-field names
(race missing), a datetime that is not 17 digits, and a damaged extension (`...357jpg.chip.jpg`,
`...657 .jpg.chip.jpg`). Names whose age or gender cannot be read are rejected under the policy.
"""

import os
import re

from agejax.data.readers.common import (
  check_root,
  clearly_not_image,
  finish,
  is_image_name,
  register,
  valid_age,
  walk_files,
  warn,
)
from agejax.data.records import AgeRecord, Dataset, Rejections

_SUFFIX = re.compile(r"(\.jpg)?\.chip\.jpg$|\.jpe?g$|\.png$", re.IGNORECASE)
_GENDER = {"0": "M", "1": "F"}


def parse_name(name: str) -> tuple[dict | None, list[str]]:
  """Parses a UTKFace file name into labels plus warnings; (None, [reason]) when age/gender are unreadable."""
  warnings = []
  m = _SUFFIX.search(name)
  stem = name[: m.start()] if m else name
  if stem.lower().endswith("jpg"):  # '...357jpg.chip.jpg': the dot before 'jpg' is missing
    stem = stem[:-3]
    warnings.append("damaged extension")
  if stem != stem.strip():
    stem = stem.strip()
    warnings.append("damaged extension")
  fields = stem.split("_")
  if len(fields) not in (3, 4) or not fields[0].isdigit():
    return None, ["unparsable UTKFace name"]
  if fields[1] not in _GENDER:
    return None, ["gender code not 0/1"]
  race, datetime = None, None
  if len(fields) == 4:
    race = int(fields[2]) if fields[2].isdigit() and int(fields[2]) <= 4 else None
    if race is None:
      warnings.append("race code not 0..4, race unknown")
    datetime = fields[3]
  else:
    warnings.append("3-field name, race unknown")
    datetime = fields[2]
  if not datetime.isdigit():
    return None, ["unparsable UTKFace name"]
  if len(datetime) != 17:
    warnings.append("datetime not 17 digits")
  labels = {"age": float(fields[0]), "gender": _GENDER[fields[1]], "race": race, "datetime": datetime}
  return labels, sorted(set(warnings))


@register("utkface", "utk")
def read_utkface(root: str, policy: str = "skip", min_age: float = 0, max_age: float = 120,
                 lenient_names: bool = True) -> Dataset:
  """Reads every image under `root`; `lenient_names=False` rejects the warning cases too."""
  root = check_root(root)
  rej = Rejections(policy)
  records = []
  for path in walk_files(root):
    name = os.path.basename(path)
    if clearly_not_image(name):
      continue
    if not is_image_name(name):
      rej.reject(path, "not an image file name")
      continue
    labels, notes = parse_name(name)
    if labels is None:
      rej.reject(path, notes[0])
      continue
    if notes and not lenient_names:
      rej.reject(path, notes[0])
      continue
    for note in notes:
      warn(rej, path, note + " (kept)")
    if not valid_age(labels["age"], rej, path, min_age, max_age):
      continue
    records.append(AgeRecord(path=path, age=labels["age"], gender=labels["gender"], source=name,
                             extra={"race": labels["race"], "datetime": labels["datetime"]}))
  return finish("utkface", root, records, rej)
