"""The one record type every dataset reader returns, and the bad-input policy.

Readers never drop silently: each rejected file or row goes through `Rejections.reject`, which raises
under the 'strict' policy and counts the reason (with a few examples) under 'skip'.
"""

import collections
import dataclasses
import json
from typing import Any, Literal

from agejax.errors import DatasetError

Policy = Literal["strict", "skip"]


@dataclasses.dataclass(frozen=True)
class AgeRecord:
  """One labelled face image.

  path:    absolute path of the image file.
  age:     real or (mean) apparent age in years.
  age_std: SD of the apparent-age votes (ChaLearn LAP, APPA-REAL), else None.
  gender:  'M', 'F' or None.
  subject: identity (MORPH id, FG-NET subject, IMDB celeb id) for subject-disjoint splits, else None.
  split:   the dataset's own split ('train', 'valid', 'test'), else None.
  source:  where the label came from ('imdb.mat:row 17', 'gt_avg_train.csv:line 4', a file name).
  extra:   dataset-specific fields (race, face_score, ...).
  """

  path: str
  age: float
  age_std: float | None = None
  gender: str | None = None
  subject: str | None = None
  split: str | None = None
  source: str = ""
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


@dataclasses.dataclass
class Rejections:
  """Counts of rejected inputs per reason, with examples; raises at once under 'strict'."""

  policy: Policy = "skip"
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  max_examples: int = 5

  def __post_init__(self):
    if self.policy not in ("strict", "skip"):
      raise ValueError(f"bad-input policy must be 'strict' or 'skip', got {self.policy!r}")

  def reject(self, where: str, reason: str) -> None:
    """Records that `where` (a file, or file:row) was rejected for `reason`."""
    if self.policy == "strict":
      raise DatasetError(f"{where}: {reason} (policy 'strict'; set policy 'skip' to drop and count such inputs)")
    self.counts[reason] += 1
    ex = self.examples.setdefault(reason, [])
    if len(ex) < self.max_examples:
      ex.append(where)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def merge(self, other: "Rejections") -> None:
    for reason, n in other.counts.items():
      self.counts[reason] += n
      ex = self.examples.setdefault(reason, [])
      ex.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(ex))])

  def to_dict(self) -> dict[str, Any]:
    return {"policy": self.policy, "total": self.total,
            "by_reason": {r: {"count": n, "examples": self.examples.get(r, [])}
                          for r, n in self.counts.most_common()}}

  def write(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2)


@dataclasses.dataclass
class Dataset:
  """Records read from one dataset plus what was rejected on the way."""

  name: str
  root: str
  records: list[AgeRecord]
  rejections: Rejections

  def __len__(self) -> int:
    return len(self.records)
