"""A run beside the authors' own per-trial results: mean ± SD per size and prior, both with ddof 0.

The authors' repository keeps one CSV per prior (`Learning_curve_results/*.csv`), a row per trained model:
`Fine_tune_PORTION_TRIAL_iter_STEPS[.caffemodel],MAE` (portion 0 = the prior untouched), plus, in some files, a
row `CHECKPOINT.caffemodel,MAE` for the untouched starting checkpoint (size 0 as well). A portion p of the
pool gives int(pool * p / 0.8) training images (pool 1981 for LAP, 4380 for MORPH 2). Files are read in the
order given (a folder's CSVs by name); a trial seen again replaces the earlier value, which is how the
authors' later files (`MORPH_100_full.csv` after `MORPH_100.csv`) superseded earlier ones. The prior comes
from the file name (PRIOR_FILES; `--prior STEM=NAME` adds or overrides one).

  python -m agejax.reports.compare --paper lap --workdir runs/lap \\
      --authors Early-Adaptation/LAP/fine-tuning/Part_1/Learning_curve_results \\
                Early-Adaptation/LAP/fine-tuning/Part_2/Learning_curve_results
"""

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from agejax.configs import PAPER_POOLS, PAPER_SOLVERS, portion_images
from agejax.errors import AgejaxError, ConfigError, DatasetError
from agejax.reports import tables

_TRIAL_RE = re.compile(r"^Fine_tune_(\d+(?:\.\d+)?)_(\d+)_iter_(\d+)(?:\.caffemodel)?$")
_CHECKPOINT_RE = re.compile(r"^[^,\s]+\.caffemodel$")
_SUFFIX_RE = re.compile(r"(?:_(?:small|full|extension|1))+$")

# Normalised file stems (lower case, '-' -> '_', suffixes _small/_full/_extension/_1 dropped) -> the names the
# paper configs give the priors; where two names fit, the first the run has is taken.
PRIOR_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "lap": {
        "imdb_wiki": ("dex",), "imdb_uniform": ("imdb-uniform",), "imdb_original": ("imdb-original",),
        "imdb_lap_matched": ("imdb-lap-matched", "lap-matched-all"),
        "imdb_lap": ("imdb-lap-matched", "lap-matched-all"),
        "lap_facenet": ("vggface",), "lap_imagenet": ("imagenet",),
        "lap_100": ("lap-matched-100",), "imdb_lap_100": ("lap-matched-100",),
        "lap_1000": ("lap-matched-1000",), "imdb_lap_1000": ("lap-matched-1000",),
        "lap_10000": ("lap-matched-10000",), "imdb_lap_10000": ("lap-matched-10000",),
    },
    "morph": {
        "imdb_wiki": ("dex",), "imdb_uniform": ("imdb-uniform",), "imdb_original": ("imdb-original",),
        "morph_matched": ("imdb-morph-matched", "morph-matched-all"),
        "imdb_matched": ("imdb-morph-matched", "morph-matched-all"),
        "facenet": ("vggface",), "vggface": ("vggface",), "imagenet": ("imagenet",),
        "morph_100": ("morph-matched-100",), "morph_1000": ("morph-matched-1000",),
        "morph_10000": ("morph-matched-10000",),
    },
}


@dataclasses.dataclass(frozen=True)
class AuthorsTrial:
  """One row of an authors' result file."""

  size: int
  trial: int
  steps: int | None  # None for a checkpoint row (the prior untouched)
  mae: float
  where: str  # FILE:LINE


@dataclasses.dataclass
class AuthorsResults:
  """The authors' MAE per (prior, size): trial -> value, with what reading them noticed."""

  trials: dict[tuple[str, int], dict[int, AuthorsTrial]] = dataclasses.field(default_factory=dict)
  replaced: int = 0
  notes: list[str] = dataclasses.field(default_factory=list)

  def values(self, prior: str, size: int) -> list[float]:
    return [t.mae for t in self.trials.get((prior, size), {}).values()]


def normalise_stem(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0].lower().replace("-", "_")
  return _SUFFIX_RE.sub("", stem)


def parse_authors_csv(path: str, paper: str) -> list[AuthorsTrial]:
  """The rows of one authors' per-trial CSV; a row of another form is an error naming FILE:LINE."""
  pool = PAPER_POOLS[paper]
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f"{path}: cannot read ({e})") from e
  out = []
  for number, text in enumerate(lines, 1):
    if not text.strip():
      continue
    where = f"{path}:{number}"
    name, _, value = text.strip().rpartition(",")
    try:
      mae = float(value)
    except ValueError:
      mae = math.nan
    m = _TRIAL_RE.match(name)
    if not math.isfinite(mae) or not (m or _CHECKPOINT_RE.match(name)):
      raise DatasetError(f"{where}: not a per-trial result row (expected 'Fine_tune_PORTION_TRIAL_iter_STEPS"
                         f"[.caffemodel],MAE' or 'CHECKPOINT.caffemodel,MAE'), got {text.strip()[:80]!r}")
    if m:
      portion = float(m.group(1))
      size = portion_images(pool, portion) if portion > 0 else 0
      out.append(AuthorsTrial(size, int(m.group(2)) if size else 0, int(m.group(3)) if size else None, mae, where))
    else:
      out.append(AuthorsTrial(0, 0, None, mae, where))
  if not out:
    raise DatasetError(f"{path}: no result rows")
  return out


def _csv_files(paths: Sequence[str]) -> list[str]:
  files = []
  for p in paths:
    if os.path.isdir(p):
      found = sorted(os.path.join(p, n) for n in os.listdir(p) if n.lower().endswith(".csv"))
      if not found:
        raise ConfigError(f"--authors {p}: the folder holds no .csv files")
      files += found
    elif os.path.isfile(p):
      files.append(p)
    else:
      raise ConfigError(f"--authors {p}: no such file or folder")
  return files


def _prior_for(path: str, paper: str, overrides: Mapping[str, str], run_priors: Sequence[str]) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  for key in (stem, normalise_stem(path)):
    if key in overrides:
      return overrides[key]
  names = PRIOR_FILES[paper].get(normalise_stem(path))
  if names is None:
    known = ", ".join(sorted(PRIOR_FILES[paper]))
    raise ConfigError(f"{path}: no prior is known for the file name {stem!r} (known stems: {known}); "
                      f"name it with --prior {stem}=PRIOR")
  return next((n for n in names if n in run_priors), names[0])


def read_authors(paths: Sequence[str], paper: str, overrides: Mapping[str, str] | None = None,
                 run_priors: Sequence[str] = ()) -> AuthorsResults:
  """The authors' per-trial MAE from their result CSVs (files or folders), by the run's prior names."""
  if paper not in PAPER_POOLS:
    raise ConfigError(f"--paper must be one of {', '.join(PAPER_POOLS)}, got {paper!r}")
  solver = {portion_images(PAPER_POOLS[paper], row[0]): row[4] for row in PAPER_SOLVERS[paper]}
  res = AuthorsResults()
  off_table: dict[str, set[int]] = {}
  for path in _csv_files(paths):
    prior = _prior_for(path, paper, dict(overrides or {}), run_priors)
    for t in parse_authors_csv(path, paper):
      if t.size and t.size not in solver:
        off_table.setdefault(os.path.basename(path), set()).add(t.size)
      elif t.size and t.steps != solver[t.size]:
        res.notes.append(f"{t.where}: {t.steps} steps, the solver table says {solver[t.size]} for {t.size} images")
      slot = res.trials.setdefault((prior, t.size), {})
      res.replaced += t.trial in slot
      slot[t.trial] = t
  for name, sizes in off_table.items():
    res.notes.append(f"{name}: sizes {sorted(sizes)} are not in the {paper} solver table")
  return res


def _stats(values: Iterable[float]) -> tuple[float, float, int]:
  v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
  if not v.size:
    return math.nan, math.nan, 0
  return float(v.mean()), float(v.std(ddof=tables.TABLE_DDOF)) if v.size > 1 else math.nan, int(v.size)


def comparison_rows(authors: AuthorsResults, run_rows: Sequence[Mapping]) -> list[dict]:
  """One row per (prior, size) either side has: the authors' and the run's (mean, SD, trials), ddof 0."""
  run = tables.summarize(run_rows, ("mae",), ddof=tables.TABLE_DDOF)
  priors = list(dict.fromkeys([*tables.priors_in_order(run_rows), *(p for p, _ in authors.trials)]))
  out = []
  for prior in priors:
    sizes = sorted({n for p, n in authors.trials if p == prior} | {n for p, n in run if p == prior})
    for n in sizes:
      a = _stats(authors.values(prior, n))
      r = run.get((prior, n), {}).get("mae", (math.nan, math.nan, 0))
      out.append({"prior": prior, "n_train": n, "authors": a, "run": r,
                  "difference": r[0] - a[0] if a[2] and r[2] else math.nan})
  return out


def _cell(stats: tuple[float, float, int]) -> tuple[str, str]:
  mean, sd, count = stats
  return (tables.format_mean_sd(mean, sd) if count else "", str(count) if count else "")


def format_comparison(rows: Sequence[Mapping], paper: str, workdir: str) -> str:
  """A Markdown table: prior, size, the authors' MAE and trials, the run's, and run minus authors."""
  lines = [f"# {paper.upper()}: the authors' per-trial MAE beside {os.path.join(workdir, 'results.csv')}",
           "", "Mean ± population SD (ddof 0, as the paper's tables) over trials; '-' marks a single trial.", "",
           "| prior | n_train | authors | trials | this run | trials | run - authors |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    a, ac = _cell(row["authors"])
    r, rc = _cell(row["run"])
    diff = f"{row['difference']:+.3f}" if math.isfinite(row["difference"]) else ""
    lines.append(f"| {row['prior']} | {row['n_train']} | {a} | {ac} | {r} | {rc} | {diff} |")
  return "\n".join(lines) + "\n"


def compare(paper: str, workdir: str, authors_paths: Sequence[str], overrides: Mapping[str, str] | None = None) -> str:
  """The comparison text for a workdir (its results.csv) and the authors' CSV files or folders."""
  path = os.path.join(workdir, "results.csv")
  if not os.path.isfile(path):
    raise ConfigError(f"--workdir {workdir}: no results.csv (run the study there first)")
  run_rows = tables.read_results(path)
  authors = read_authors(authors_paths, paper, overrides, tables.priors_in_order(run_rows))
  text = format_comparison(comparison_rows(authors, run_rows), paper, workdir)
  notes = ([f"{authors.replaced} authors' trials were given again by a later file; the later value is used."]
           if authors.replaced else []) + authors.notes
  return text + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m agejax.reports.compare", description=__doc__.split("\n")[0])
  parser.add_argument("--paper", required=True, choices=sorted(PAPER_POOLS))
  parser.add_argument("--workdir", required=True, help="a study's workdir (its results.csv)")
  parser.add_argument("--authors", required=True, nargs="+", help="the authors' result CSVs, or folders of them")
  parser.add_argument("--prior", action="append", default=[], metavar="STEM=NAME",
                      help="the run's prior name for an authors' file (by its name without .csv)")
  args = parser.parse_args(argv)
  overrides = {}
  for item in args.prior:
    stem, eq, name = item.partition("=")
    if not eq or not stem or not name:
      parser.error(f"--prior {item!r}: expected STEM=NAME")
    overrides[stem] = name
  try:
    print(compare(args.paper, args.workdir, args.authors, overrides), end="")
  except AgejaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
