"""The UTKFace study (configs/utkface.py: same priors, sizes, solver and trial counts) on YOUR faces: any CSV
with a header holding `path` and `age`, optionally `split` (train/test) and `subject` (a person's id).

  path,age,split,subject
  faces/anna_2019.jpg,31,train,anna
  /data/faces/ben.png,45,test,ben

Relative paths resolve against the CSV's folder. With a `split` column, 'test' rows are the test set and
'train' rows the pool (every row must say one or the other); without it a seeded test set of 20% of the rows
(at most configs/utkface.py's test_size) is drawn, exact duplicates never straddling it, and with a `subject`
column one person's images all fall on one side. The pool is capped like UTKFace's (`data.pool_limit`, a
seeded draw) and sizes above it are dropped. Each real prior sees the images through its UTKFace crop view
(the WRN pads tight chips by 40% per side; configs/utkface.py): crop your faces like UTKFace's chips.
Arguments: `csv=PATH` (required) plus every argument of configs/utkface.py (`runlocal`, `lite0=DIR`, `wrn=DIR`,
`dlib=DIR`, `scratch=False`, ...).

  python -m agejax.main --config configs/custom.py:csv=my_faces/labels.csv,runlocal --workdir runs/mine
  python -m agejax.main --config configs/custom.py:csv=my_faces/labels.csv,runlocal,wrn=priors/wrn,scratch=False \\
      --workdir runs/mine_wrn --config.data.test_size=100

The CSV is checked when the config loads (file, columns); rows and images when the data loads: an age that is
not a number stops the run naming file:line, a missing image is dropped and named in data_report.json, and when
no listed image exists the error names the first few paths.
"""

import math
import os

import ml_collections

from agejax.data.readers.common import csv_table, parse_float
from agejax.data.readers.generic import check_header
from agejax.errors import ConfigError
from configs import utkface

TEST_FRACTION = 0.2


def _csv_facts(path: str) -> tuple[int, int | None, float | None]:
  """(rows, rows marked 'train' or None without a split column, mean of the numeric ages) of the CSV."""
  header, rows = csv_table(path)
  check_header(header, path)
  col = {h: j for j, h in enumerate(header)}

  def cell(cells: list[str], name: str) -> str:
    j = col.get(name)
    return cells[j].strip() if j is not None and j < len(cells) else ""

  ages = [a for _, r in rows if (a := parse_float(cell(r, "age"))) is not None and math.isfinite(a)]
  splits = [cell(r, "split").lower() for _, r in rows]
  train = sum(s == "train" for s in splits) if any(splits) else None
  return len(rows), train, (sum(ages) / len(ages) if ages else None)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  items = [item for item in (arg or "").split(",") if item]
  given = [value for key, _, value in (i.partition("=") for i in items) if key == "csv"]
  rest = ",".join(i for i in items if i.partition("=")[0] != "csv")
  try:
    c = utkface.get_config(rest)  # the prior keys and every other argument are configs/utkface.py's
  except ValueError as e:
    if str(e).startswith("unknown config argument"):
      raise ValueError(f"{e}, and csv (configs/custom.py)") from None
    raise
  csv_arg = given[-1] if given else ""
  if not csv_arg:
    raise ConfigError("configs/custom.py needs csv=PATH: a CSV with 'path' and 'age' columns "
                      "(e.g. --config configs/custom.py:csv=my_faces/labels.csv,runlocal)")
  csv = os.path.abspath(os.path.expanduser(csv_arg))
  if not os.path.isfile(csv):
    full = "" if csv == csv_arg else f" ({csv})"
    raise ConfigError(f"configs/custom.py: csv={csv_arg!r} does not exist{full}")
  n_rows, n_train, mean_age = _csv_facts(csv)
  c.title = f"Few-shot learning curve on {os.path.basename(csv)} (your faces)"
  test_size = min(c.data.test_size, max(1, round(n_rows * TEST_FRACTION)))
  c.data.update(name="generic", root=csv, test_size=test_size, test_fraction=TEST_FRACTION, split_column=True,
                reader_options=dict(strict_ages=True))
  pool = n_train if n_train is not None else n_rows - test_size
  pool = min(pool, c.data.pool_limit or pool)
  sizes = tuple(r for r in c.sizes if isinstance(r[0], float) or r[0] <= pool)
  c.sizes = sizes or tuple(c.sizes[:1])  # sizes above the pool would all be capped to the same size
  if mean_age is not None:
    c.model.init_age = round(mean_age, 1)  # a regression head starts at the data's mean age
  return c
