"""AgeDB: `{id}_{Name}_{age}_{gender}.jpg`; names contain spaces and underscores, so fields split from the right."""

import os

from agejax.data.readers.common import check_root, finish, gender_code, named_images, register, valid_age
from agejax.data.records import AgeRecord, Dataset, Rejections


def parse_name(name: str) -> dict | None:
  """{'id', 'name', 'age', 'gender'} or None when the name does not follow the pattern."""
  stem = os.path.splitext(name)[0]
  parts = stem.rsplit("_", 2)
  if len(parts) != 3 or "_" not in parts[0]:
    return None
  ident, person = parts[0].split("_", 1)
  gender = gender_code(parts[2])
  if not ident.isdigit() or not parts[1].isdigit() or gender is None or not person:
    return None
  return {"id": ident, "name": person, "age": float(parts[1]), "gender": gender}


@register("agedb")
def read_agedb(root: str, policy: str = "skip", min_age: float = 0, max_age: float = 120) -> Dataset:
  """Reads every image under `root`; subject is the person's name (AgeDB ids are per image)."""
  root = check_root(root)
  rej = Rejections(policy)
  records = []
  for path, name, p in named_images(root, rej, parse_name, "0_MariaCallas_35_f.jpg"):
    if not valid_age(p["age"], rej, path, min_age, max_age):
      continue
    records.append(AgeRecord(path=path, age=p["age"], gender=p["gender"], subject=p["name"], source=name,
                             extra={"id": p["id"]}))
  return finish("agedb", root, records, rej)
