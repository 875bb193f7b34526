"""Per-trial result rows in a CSV file, and their summary as tables laid out like the paper's Table 1.

One row per (prior, training-set size, trial). The CSV is appended to as trials finish, so a resumed run adds
its rows to the same file; when a trial appears twice (it was re-run after an interruption) the last row wins.
Size 0 is the prior evaluated without fine-tuning. The transfer study's rows (one per backbone and mode) go through
the same CSV writer and reader, with its own columns, and `transfer_table_markdown` lays them out as Table 2.
"""

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FIELDS = ("prior", "n_train", "trial", "seed", "mae", "eps_error", "cs5", "plcc", "srocc", "steps", "wall_s")
METRIC_FIELDS = ("mae", "eps_error", "cs5", "plcc", "srocc")
METRIC_LABELS = {"mae": "MAE", "eps_error": "ε-error", "cs5": "CS@5", "plcc": "PLCC", "srocc": "SROCC"}
_INT_FIELDS = frozenset({"n_train", "trial", "seed", "steps"})
_STR_FIELDS = frozenset({"prior"})

Row = dict[str, Any]
Summary = dict[tuple[str, int], dict[str, tuple[float, float, int]]]
# The SD of table.md: the population SD (numpy's np.std, ddof 0), as the authors computed Tables 1-4 (their
# learning_curve_statistics.py); results.csv keeps every trial, so any other statistic can be recomputed.
TABLE_DDOF = 0


def _header(rows: Sequence[Mapping[str, Any]], existing: Sequence[str] = (),
            fields: Sequence[str] = RESULT_FIELDS) -> list[str]:
  """`fields`, then the existing file's extra columns, then new extra columns in first-seen order."""
  header = list(fields)
  for name in [*existing, *(k for row in rows for k in row)]:
    if name not in header:
      header.append(name)
  return header


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float | np.floating):
    return repr(float(value))  # shortest text that reads back to the same float, 'nan' included
  if isinstance(value, np.integer):
    return str(int(value))
  return str(value)


def _parse(name: str, text: str, text_fields: frozenset[str] = _STR_FIELDS) -> Any:
  if text == "":
    return None
  if name in text_fields:
    return text
  if name in _INT_FIELDS:
    return int(float(text))
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text if name not in METRIC_FIELDS and name != "wall_s" else float("nan")


def _drop_partial_line(path: Path) -> None:
  """Cuts a last line left without its newline by an interrupted write (that row never finished)."""
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def append_results(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                   fields: Sequence[str] = RESULT_FIELDS) -> Path:
  """Appends result rows to a CSV file, writing the header only when the file is new.

  Columns are `fields` (the learning curve's RESULT_FIELDS by default) followed by any extra keys (e.g.
  'train_loss', 'split_file'). A row with a column the file lacks makes the file be rewritten once with the wider
  header; missing cells are left empty.
  """
  path = Path(path)
  rows = [dict(r) for r in rows]
  path.parent.mkdir(parents=True, exist_ok=True)
  existing: list[str] = []
  if path.exists() and path.stat().st_size > 0:
    _drop_partial_line(path)
    with open(path, newline="") as f:
      existing = next(csv.reader(f), [])
  header = _header(rows, existing, fields)
  if existing and header != existing:
    rows = read_results(path) + rows
    existing = []
    path.unlink()
  with open(path, "a", newline="") as f:
    writer = csv.writer(f)
    if not existing:
      writer.writerow(header)
    for row in rows:
      writer.writerow([_cell(row.get(k)) for k in header])
    f.flush()
    os.fsync(f.fileno())
  return path


def read_results(path: str | os.PathLike, text_fields: Iterable[str] = _STR_FIELDS) -> list[Row]:
  """Reads result rows back with numbers as int/float, `text_fields` (the prior) as str, empty cells as None."""
  path = Path(path)
  if not path.exists():
    return []
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      return []
    text_fields = frozenset(text_fields)
    return [{k: _parse(k, v, text_fields) for k, v in zip(header, line, strict=True)}
            for line in reader if len(line) == len(header)]


def _finite(value: Any) -> bool:
  return isinstance(value, int | float | np.number) and math.isfinite(value)


def latest_trials(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """Keeps the last row for each (prior, n_train, trial), in first-seen order."""
  latest: dict[tuple[Any, Any, Any], Mapping[str, Any]] = {}
  for row in rows:
    latest[(row["prior"], row["n_train"], row["trial"])] = row
  return list(latest.values())


def summarize(rows: Iterable[Mapping[str, Any]], metrics: Sequence[str] = METRIC_FIELDS, ddof: int = 1) -> Summary:
  """Mean, SD (sample SD with the default ddof=1; TABLE_DDOF for the paper's) and trial count per (prior, n_train).

  Missing or nan values (e.g. no eps-error without vote SDs) are left out, so the count is per metric. The SD
  of a single trial is nan, shown as '-' in tables; a metric with no values at all gives (nan, nan, 0).
  """
  groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
  for row in latest_trials(rows):
    groups.setdefault((str(row["prior"]), int(row["n_train"])), []).append(row)
  summary: Summary = {}
  for key, members in groups.items():
    stats = {}
    for metric in metrics:
      values = np.array([r[metric] for r in members if _finite(r.get(metric))], dtype=np.float64)
      mean = float(values.mean()) if values.size else float("nan")
      sd = float(values.std(ddof=ddof)) if values.size > 1 else float("nan")
      stats[metric] = (mean, sd, int(values.size))
    summary[key] = stats
  return summary


def priors_in_order(rows: Iterable[Mapping[str, Any]]) -> list[str]:
  """The priors in the order they first appear."""
  return list(dict.fromkeys(str(r["prior"]) for r in rows))


def format_mean_sd(mean: float, sd: float, decimals: int = 3) -> str:
  """'mean ± sd', with '-' for the SD of a single trial and '' for no value."""
  if not math.isfinite(mean):
    return ""
  spread = f"{sd:.{decimals}f}" if math.isfinite(sd) else "-"
  return f"{mean:.{decimals}f} ± {spread}"


def table_markdown(rows: Sequence[Mapping[str, Any]], metric: str = "mae", priors: Sequence[str] | None = None,
                   decimals: int = 3, ddof: int = 1) -> str:
  """A Markdown table: one row per training-set size (0 = prior untouched), one column per prior, and trials.

  The trials column gives the count once when every prior agrees, else one count per prior separated by '/'.
  """
  priors = list(priors) if priors is not None else priors_in_order(rows)
  summary = summarize(rows, (metric,), ddof)
  sizes = sorted({n for _, n in summary})
  columns = ["n_train", *priors, "trials"]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
  for n in sizes:
    cells, counts = [], []
    for prior in priors:
      mean, sd, count = summary.get((prior, n), {}).get(metric, (float("nan"), float("nan"), 0))
      cells.append(format_mean_sd(mean, sd, decimals))
      counts.append(count)
    present = [c for c in counts if c]
    trials = str(present[0]) if len(set(present)) == 1 else "/".join(str(c) for c in counts)
    lines.append(f"| {n} | " + " | ".join(cells) + f" | {trials} |")
  return "\n".join(lines) + "\n"


def write_tables(workdir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], title: str = "Results",
                 ddof: int = TABLE_DDOF) -> Path:
  """Writes workdir/table.md: MAE, then CS@5, PLCC and SROCC, and eps-error when any trial has it; SD with `ddof`."""
  path = Path(workdir) / "table.md"
  path.parent.mkdir(parents=True, exist_ok=True)
  summary = summarize(rows)
  has_eps = any(stats["eps_error"][2] for stats in summary.values())
  metrics = ["mae", *(["eps_error"] if has_eps else []), "cs5", "plcc", "srocc"]
  kind = "population SD (ddof 0, numpy's np.std, as the paper's Tables 1-4)" if ddof == 0 else f"SD (ddof {ddof})"
  parts = [f"# {title}\n", f"Cells: mean ± {kind} over trials; '-' marks a single trial. "
           "Size 0 is the prior without fine-tuning. results.csv holds every trial.\n"]
  for metric in metrics:
    parts.append(f"## {METRIC_LABELS[metric]}\n")
    parts.append(table_markdown(rows, metric, ddof=ddof))
  path.write_text("\n".join(parts))
  return path


# -- the transfer study (report Table 2) ----------------------------------------------------------------------
TRANSFER_MODE_LABELS = {"frozen": "Linear layers fine-tuned", "full": "All layers fine-tuned"}


def _num(value: Any, decimals: int = 3) -> str:
  try:
    v = float(value)
  except (TypeError, ValueError):
    return str(value)
  return f"{v:.{decimals}f}" if math.isfinite(v) else "-"


def transfer_table_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
  """The report's Table 2 layout: network and regime, test loss (MAE), PLCC, SROCC, plus CS@5 and timing."""
  lines = [f"# {title}\n", "Test loss = MAE in years on the test set with the best-validation epoch's weights "
           "(the report's loss column, 0.047-0.087, is on a different scale). PLCC / SROCC: Pearson / Spearman "
           "correlation of predicted and true age.\n",
           "| Network | Regime | Test loss (MAE) | PLCC | SROCC | CS@5 | val MAE | best epoch / run | train s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['backbone']} | {TRANSFER_MODE_LABELS.get(r['mode'], r['mode'])} | {_num(r['test_mae'])} | "
                 f"{_num(r['plcc'])} | {_num(r['srocc'])} | {_num(r['cs5'])} | {_num(r['val_mae'])} | "
                 f"{_num(r['best_epoch'], 1)} / {_num(r['epochs_run'], 1)} | {_num(r['train_wall_s'], 0)} |")
  return "\n".join(lines) + "\n"


def write_transfer_table(workdir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], title: str) -> str:
  """Writes workdir/table.md in the Table 2 layout; returns its text (for TensorBoard)."""
  text = transfer_table_markdown(rows, title)
  path = Path(workdir) / "table.md"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return text
