"""The one record type every dataset reader returns, and the bad-input policy.

Readers never drop silently: each rejected file or row goes through `Rejections.reject`, which raises
under the 'strict' policy and, under 'skip', counts the reason and keeps the name of every input dropped.
"""

import collections
import dataclasses
import json
from typing import Any, Literal, get_args

from agejax.errors import DatasetError

Policy = Literal["strict", "skip"]
WARNING = "warning: "  # reasons starting with this describe inputs that were kept


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
  """Every rejected input per reason, by name; raises at once under 'strict'.

  `examples[reason]` lists every file (or file:row) rejected or flagged for that reason, in the order seen, with
  no cap, so `data_report.json` names each one. Reasons starting with 'warning: ' flag inputs that were kept.
  """

  policy: Policy = "skip"
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.policy not in get_args(Policy):
      raise ValueError(f"bad-input policy must be one of {get_args(Policy)}, got {self.policy!r}")

  def reject(self, where: str, reason: str) -> None:
    """Records that `where` (a file, or file:row) was rejected for `reason`."""
    if self.policy == "strict":
      raise DatasetError(f"{where}: {reason} (policy 'strict'; set policy 'skip' to drop and count such inputs)")
    self.flag(where, reason)

  def flag(self, where: str, reason: str) -> None:
    """Counts and names `where` under `reason` without raising (a kept-but-suspicious input, or a rejection)."""
    self.counts[reason] += 1
    self.examples.setdefault(reason, []).append(where)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  @property
  def rejected(self) -> int:
    """Inputs dropped (reasons that are not warnings about kept inputs)."""
    return sum(n for r, n in self.counts.items() if not r.startswith(WARNING))

  def merge(self, other: "Rejections") -> None:
    for reason, n in other.counts.items():
      self.counts[reason] += n
      self.examples.setdefault(reason, []).extend(other.examples.get(reason, []))

  def to_dict(self) -> dict[str, Any]:
    """The full report: policy, totals and, per reason, the count and every file."""
    return {"policy": self.policy, "total": self.total, "rejected": self.rejected,
            "by_reason": {r: {"count": n, "files": self.examples.get(r, [])} for r, n in self.counts.most_common()}}

  def counts_by_reason(self) -> dict[str, int]:
    """{reason: count}, most frequent first (for data_info.json; the names are in data_report.json)."""
    return dict(self.counts.most_common())

  def summary(self, names: int = 3, report: str = "data_report.json") -> list[str]:
    """Console lines: the totals, one line per reason with its count and first `names` files, and where the full
    list is. Empty when nothing was rejected or flagged."""
    if not self.counts:
      return []
    lines = [f"{self.rejected} inputs rejected, {self.total - self.rejected} kept with a warning "
             f"(policy {self.policy!r})"]
    for reason, n in self.counts.most_common():
      shown = self.examples.get(reason, [])[:names]
      lines.append(f"  {n} {reason}: {', '.join(shown)}{', ...' if n > len(shown) else ''}")
    return lines + [f"  every one is listed in {report}"]

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
