"""FG-NET: `078A11.JPG` is subject 78 at age 11; an optional `a`/`b` marks a second photo at that age."""

import re

from agejax.data.readers.common import check_root, finish, named_images, register, valid_age
from agejax.data.records import AgeRecord, Dataset, Rejections

NAME_RE = re.compile(r"(\d{3})a(\d{2})([ab]?)\.jpe?g", re.IGNORECASE)


@register("fgnet", "fg_net")
def read_fgnet(root: str, policy: str = "skip", min_age: float = 0, max_age: float = 120) -> Dataset:
  """Reads every image under `root`; names not in the FG-NET pattern are rejected."""
  root = check_root(root)
  rej = Rejections(policy)
  records = []
  for path, name, m in named_images(root, rej, NAME_RE.fullmatch, "078A11.JPG"):
    age = float(m.group(2))
    if not valid_age(age, rej, path, min_age, max_age):
      continue
    records.append(AgeRecord(path=path, age=age, subject=str(int(m.group(1))), source=name,
                             extra={"variant": m.group(3).lower() or None}))
  return finish("fgnet", root, records, rej)
