"""Compares a demo results.csv with the one recorded before the engine redesign (issue 14), column by column,
ignoring the timing columns. Exit status 1 and the first differences when they are not identical.

  python -m agejax.main --config configs/demo.py --workdir /tmp/demo_after --config.trials.conv_impl=canonical
  python docs/results/redesign/compare.py /tmp/demo_after/results.csv
"""

import csv
import os
import sys

TIMING = {"wall_s", "train_images_per_s"}
BEFORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_results_before.csv")


def rows(path: str) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def main() -> int:
  before, after = rows(BEFORE), rows(sys.argv[1])
  if len(before) != len(after):
    print(f"{len(before)} rows before, {len(after)} after")
    return 1
  diffs = [(i, k, b[k], a.get(k)) for i, (b, a) in enumerate(zip(before, after)) for k in b if b[k] != a.get(k)]
  for i, k, b, a in diffs[:10]:
    print(f"row {i + 2} {k}: before {b!r}, after {a!r}")
  print(f"{len(before)} rows, {len(before[0])} non-timing columns: {len(diffs)} differences")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.exit(main())
