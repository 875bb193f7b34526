"""Diagnostics of a finished run (the report's Figs 4-8, the paper's Fig. 3), from what the workdir holds.

  python -m agejax.reports.diagnostics --workdir W [--no-near] [--no-tensorboard]

Reads W/predictions.csv (run, split, path, age, pred: per-image test predictions, written by the transfer
study), W/splits/*.txt (one `path<TAB>age` per line per split) and W/priors/*/pretrain_stage.json (histograms
of resampled sources), and writes W/diagnostics/:
  scatter_RUN.png         predicted vs true age with y = x, a least-squares line, |error| >= 40 years in red;
  gallery_worst_RUN.png   the worst errors (every |error| >= `gross`, else the largest few);
  gallery_band_RUN.png    a seeded sample of errors within the band (15-20 years by default);
  age_histograms.png      the age distribution of every split; source_distributions.png: each pre-training
                          stage's source, its resampled training set and the target (like the paper's Fig. 3);
  report.md, report.json  per-run error counts, duplicate images (exact by content hash, near by perceptual
                          hash; groups spanning splits leak labels) and suspected label errors (test images
                          whose error is at least `suspect_error` years, in the same direction, in at least
                          `min_agree` runs: when several models agree the label is more likely wrong).
Each plot also goes to TensorBoard (W/tb) under `diagnostics/`. What a workdir lacks is skipped and listed.
"""

import argparse
import csv
import glob
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from agejax.engine.metrics import mae, plcc, srocc
from agejax.errors import AgejaxError, DatasetError
from agejax.reports import plots
from agejax.reports.tensorboard import Logger

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
PREDICTION_FIELDS = ("run", "split", "path", "age", "pred")
DEFAULTS = {"gross": 40.0, "band": (15.0, 20.0), "gallery_size": 16, "suspect_error": 20.0, "min_agree": 0,
            "near": True, "near_distance": 4, "seed": 0}
ImageLookup = Callable[[str], np.ndarray | None]


# -- files -------------------------------------------------------------------------------------------------
def write_split(path: str, names: Sequence[str], ages: Sequence[float]) -> None:
  """One `name<TAB>age` line per image (a '#' header line first)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(f"# {len(names)} images: path<TAB>age\n")
    f.writelines(f"{n}\t{float(a):g}\n" for n, a in zip(names, ages, strict=True))


def read_split(path: str) -> tuple[list[str], np.ndarray]:
  names, ages = [], []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if line.startswith("#") or not line.strip():
        continue
      try:
        name, age = line.rstrip("\n").split("\t")[:2]
        ages.append(float(age))
      except ValueError:
        raise DatasetError(f"{path}:{number}: expected `path<TAB>age`, got {line.strip()[:80]!r}") from None
      names.append(name)
  return names, np.asarray(ages, np.float64)


def append_predictions(path: str, run: str, names: Sequence[str], ages: Sequence[float], preds: Sequence[float],
                       split: str = "test") -> None:
  """Appends one run's per-image predictions to a predictions CSV."""
  new = not os.path.exists(path)
  with open(path, "a", newline="") as f:
    w = csv.writer(f)
    if new:
      w.writerow(PREDICTION_FIELDS)
    w.writerows((run, split, n, f"{float(a):g}", f"{float(p):.4f}") for n, a, p in zip(names, ages, preds, strict=True))


def read_predictions(path: str, split: str = "test") -> dict[str, dict[str, Any]]:
  """{run: {'names': [...], 'ages': array, 'preds': array}} for one split."""
  out: dict[str, dict[str, Any]] = {}
  with open(path, newline="") as f:
    for number, row in enumerate(csv.DictReader(f), 2):
      if row.get("split", "test") != split:
        continue
      try:
        run, name, age, pred = row["run"], row["path"], float(row["age"]), float(row["pred"])
      except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}:{number}: malformed prediction row ({type(e).__name__}: {e})") from None
      r = out.setdefault(run, {"names": [], "ages": [], "preds": []})
      r["names"].append(name)
      r["ages"].append(age)
      r["preds"].append(pred)
  for r in out.values():
    r["ages"], r["preds"] = np.asarray(r["ages"]), np.asarray(r["preds"])
  return out


def stage_histograms(workdir: str) -> dict[str, dict[str, Any]]:
  """{stage name: {'source'|'resampled'|'target': age histogram, 'mode': str}} from W/priors/*/pretrain_stage.json."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "priors", "*", "pretrain_stage.json"))):
    with open(path) as f:
      stage = json.load(f)
    out[stage["name"]] = {k: np.asarray(v) for k, v in stage.get("histograms", {}).items()}
    out[stage["name"]]["mode"] = stage.get("mode", "original")
  return out


def ages_from_histogram(hist: Sequence[int]) -> np.ndarray:
  return np.repeat(np.arange(len(hist)), np.asarray(hist, dtype=np.int64)).astype(np.float64)


# -- selections --------------------------------------------------------------------------------------------
def worst_errors(errors: np.ndarray, gross: float, k: int) -> np.ndarray:
  """Indices of every |error| >= gross (largest first, at most 4k), or of the k largest when none is."""
  order = np.argsort(-np.abs(errors), kind="stable")
  big = order[np.abs(errors[order]) >= gross]
  return big[: 4 * k] if len(big) else order[:k]


def band_errors(errors: np.ndarray, lo: float, hi: float, k: int, seed: int) -> np.ndarray:
  """A seeded sample of at most k indices with lo <= |error| <= hi (the report's Figs 7-8)."""
  idx = np.flatnonzero((np.abs(errors) >= lo) & (np.abs(errors) <= hi))
  if len(idx) > k:
    idx = np.sort(np.random.default_rng(seed).choice(idx, k, replace=False))
  return idx


def label_suspects(runs: Mapping[str, Mapping[str, Any]], threshold: float, min_agree: int = 0) -> list[dict]:
  """Test images whose error is >= threshold in the same direction in at least `min_agree` runs.

  min_agree 0 means: every run when there are two, else half the runs (at least 2); with one run, 1.
  """
  if not runs:
    return []
  n_runs = len(runs)
  need = min_agree or (1 if n_runs == 1 else max(2, math.ceil(n_runs / 2)))
  per_image: dict[str, dict[str, Any]] = {}
  for run, r in runs.items():
    for name, age, pred in zip(r["names"], r["ages"], r["preds"], strict=True):
      entry = per_image.setdefault(name, {"path": name, "age": float(age), "preds": {}})
      entry["preds"][run] = float(pred)
  out = []
  for entry in per_image.values():
    errs = np.array([p - entry["age"] for p in entry["preds"].values()])
    for sign in (1, -1):
      agree = int(np.sum(sign * errs >= threshold))
      if agree >= need:
        out.append({**entry, "agree": agree, "runs": len(errs), "median_pred": float(np.median(list(
            entry["preds"].values()))), "direction": "older" if sign > 0 else "younger"})
  return sorted(out, key=lambda e: (-e["agree"], -abs(e["median_pred"] - e["age"])))


def duplicate_report(split_names: Mapping[str, Sequence[str]], near: bool = True, near_distance: int = 4) -> dict:
  """Exact (and near) duplicate groups among the existing image files of the splits, and which splits they span."""
  from agejax.data.duplicates import exact_duplicate_groups, near_duplicate_groups
  from agejax.data.records import Rejections

  where: dict[str, set[str]] = {}
  for split, names in split_names.items():
    for n in names:
      where.setdefault(n, set()).add(split)
  files = sorted(p for p in where if os.path.isfile(p))
  if not files:
    return {"checked_files": 0, "note": "no image files to check (synthetic data or files moved)"}

  def describe(groups: list[list[str]]) -> dict:
    items = [{"files": g, "splits": sorted(set().union(*(where[p] for p in g)))} for g in groups]
    return {"groups": len(groups), "extra_copies": sum(len(g) - 1 for g in groups),
            "cross_split_groups": sum(len(i["splits"]) > 1 for i in items),
            "within_test_groups": sum(i["splits"] == ["test"] for i in items), "examples": items[:20]}

  out = {"checked_files": len(files), "exact": describe(exact_duplicate_groups(files))}
  if near:
    unreadable = Rejections("skip")  # a file that no longer decodes is named, not fatal
    out["near"] = describe(near_duplicate_groups(files, max_distance=near_distance, rejections=unreadable))
    out["near"]["max_hamming_distance"] = near_distance
    if unreadable.total:
      out["near"]["undecodable_files"] = [p for names in unreadable.examples.values() for p in names]
  return out


# -- figures -----------------------------------------------------------------------------------------------
def _load_image(name: str, lookup: ImageLookup | None) -> np.ndarray | None:
  image = lookup(name) if lookup is not None else None
  if image is None and os.path.isfile(name):
    from PIL import Image

    with Image.open(name) as im:
      image = np.asarray(im.convert("RGB"))
  return image


def gallery_figure(images: Sequence[np.ndarray], captions: Sequence[str], title: str, ncols: int = 8) -> Figure:
  """A grid of images with a caption under each."""
  n = max(len(images), 1)
  ncols = min(ncols, n)
  nrows = math.ceil(n / ncols)
  fig = Figure(figsize=(1.7 * ncols, 1.95 * nrows + 0.5), layout="constrained")
  FigureCanvasAgg(fig)
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
  for ax in axes:
    ax.axis("off")
  for ax, image, caption in zip(axes, images, captions, strict=False):
    ax.imshow(image)
    ax.set_title(caption, fontsize=8)
  fig.suptitle(title, fontsize=11)
  return fig


def _gallery(names: Sequence[str], ages: np.ndarray, preds: np.ndarray, idx: np.ndarray, title: str,
             lookup: ImageLookup | None) -> Figure | None:
  images, captions = [], []
  for i in idx:
    image = _load_image(names[i], lookup)
    if image is None:
      continue
    images.append(image)
    captions.append(f"true {ages[i]:g} / pred {preds[i]:.0f}")
  return gallery_figure(images, captions, title) if images else None


def _save(fig: Figure, path: str, logger: Logger | None, tag: str) -> str:
  fig.savefig(path, dpi=110, format="png")
  if logger is not None:
    logger.figure(tag, fig, 0)
  return path


# -- the whole report --------------------------------------------------------------------------------------
def _split_ages(workdir: str) -> dict[str, tuple[list[str], np.ndarray]]:
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "splits", "*.txt"))):
    out[os.path.splitext(os.path.basename(path))[0]] = read_split(path)
  return out


def run_diagnostics(workdir: str, image_lookup: ImageLookup | None = None, logger: Logger | None = None,
                    split_ages: Mapping[str, np.ndarray] | None = None, options: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
  """Writes W/diagnostics/ (see the module docstring) and returns the report as a dict."""
  opt = {**DEFAULTS, **dict(options or {})}
  out_dir = os.path.join(workdir, "diagnostics")
  os.makedirs(out_dir, exist_ok=True)
  report: dict[str, Any] = {"options": {k: list(v) if isinstance(v, tuple) else v for k, v in opt.items()},
                            "runs": {}, "files": [], "skipped": []}
  splits = _split_ages(workdir)
  ages = {k: np.asarray(v) for k, v in (split_ages or {}).items()} or {k: a for k, (_, a) in splits.items()}
  with matplotlib.rc_context(plots._STYLE):
    if ages:
      fig = plots.age_histograms_figure(ages, title="Age distribution of the splits")
      report["files"].append(_save(fig, os.path.join(out_dir, "age_histograms.png"), logger,
                                   "diagnostics/age_histograms"))
    else:
      report["skipped"].append("age_histograms.png: no splits/*.txt")
    stages = stage_histograms(workdir)
    if stages:
      named = {}
      for name, hists in stages.items():
        if "source" in hists and "source (as is)" not in named:
          named["source (as is)"] = ages_from_histogram(hists["source"])
        named[f"{name}: training set ({hists['mode']})"] = ages_from_histogram(hists["resampled"])
        if "target" in hists:
          named["target"] = ages_from_histogram(hists["target"])
      named = {k: v for k, v in named.items() if len(v)}
      fig = plots.age_histograms_figure(named, panels=True, title="Pre-training sources and imposed distributions")
      report["files"].append(_save(fig, os.path.join(out_dir, "source_distributions.png"), logger,
                                   "diagnostics/source_distributions"))
      report["stages"] = {name: {k: v if k == "mode" else int(np.sum(v)) for k, v in h.items()}
                          for name, h in stages.items()}
    pred_path = os.path.join(workdir, PREDICTIONS_FILE)
    runs = read_predictions(pred_path) if os.path.exists(pred_path) else {}
    if not runs:
      report["skipped"].append(f"scatter and galleries: no {PREDICTIONS_FILE} (per-image test predictions)")
    lo, hi = opt["band"]
    for run, r in runs.items():
      err = r["preds"] - r["ages"]
      report["runs"][run] = {"images": len(err), "mae": mae(r["preds"], r["ages"]),
                             "plcc": plcc(r["preds"], r["ages"]), "srocc": srocc(r["preds"], r["ages"]),
                             "gross_errors": int(np.sum(np.abs(err) >= opt["gross"])),
                             "band_errors": int(np.sum((np.abs(err) >= lo) & (np.abs(err) <= hi)))}
      fig = plots.scatter_figure(r["preds"], r["ages"], opt["gross"], title=f"Predicted vs true age: {run}")
      report["files"].append(_save(fig, os.path.join(out_dir, f"scatter_{run}.png"), logger,
                                   f"diagnostics/scatter/{run}"))
      for kind, idx, title in (
          ("worst", worst_errors(err, opt["gross"], opt["gallery_size"]), f"{run}: largest errors"),
          ("band", band_errors(err, lo, hi, opt["gallery_size"], opt["seed"]),
           f"{run}: errors of {lo:g}-{hi:g} years")):
        fig = _gallery(r["names"], r["ages"], r["preds"], idx, title, image_lookup)
        if fig is None:
          report["skipped"].append(f"gallery_{kind}_{run}.png: no images ({len(idx)} selected, none readable)")
          continue
        report["files"].append(_save(fig, os.path.join(out_dir, f"gallery_{kind}_{run}.png"), logger,
                                     f"diagnostics/gallery_{kind}/{run}"))
  report["duplicates"] = duplicate_report({k: n for k, (n, _) in splits.items()}, opt["near"], opt["near_distance"])
  suspects = label_suspects(runs, opt["suspect_error"], opt["min_agree"])
  dup_files = {p for g in report["duplicates"].get("exact", {}).get("examples", []) for p in g["files"]}
  for s in suspects:
    s["has_exact_duplicate"] = s["path"] in dup_files
  report["label_suspects"] = suspects
  report["files"] = [os.path.relpath(p, workdir) for p in report["files"]]
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report_markdown(report))
  if logger is not None:
    logger.text("diagnostics", report_markdown(report), 0)
  return report


def report_markdown(report: Mapping[str, Any]) -> str:
  """The report as Markdown: runs, duplicates, suspected label errors, files and what was skipped."""
  opt = report["options"]
  lines = ["# Diagnostics\n"]
  if report["runs"]:
    lo, hi = opt["band"]
    lines += [f"| run | test images | MAE | PLCC | SROCC | abs error >= {opt['gross']:g} | {lo:g}-{hi:g} years |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {run} | {r['images']} | {r['mae']:.3f} | {r['plcc']:.3f} | {r['srocc']:.3f} | {r['gross_errors']} | "
              f"{r['band_errors']} |" for run, r in report["runs"].items()]
  dup = report.get("duplicates", {})
  lines.append("\n## Duplicate images\n")
  if dup.get("checked_files"):
    for kind in ("exact", "near"):
      if kind in dup:
        d = dup[kind]
        lines.append(f"- {kind}: {d['groups']} groups ({d['extra_copies']} extra copies) among "
                     f"{dup['checked_files']} files; {d['cross_split_groups']} span two splits, "
                     f"{d['within_test_groups']} lie within the test set")
  else:
    lines.append(f"- {dup.get('note', 'not checked')}")
  suspects = report.get("label_suspects", [])
  lines.append(f"\n## Suspected label errors ({len(suspects)})\n")
  if suspects:
    lines += ["| image | label | median prediction | runs agreeing | direction |", "|---|---:|---:|---:|---|"]
    lines += [f"| {os.path.basename(s['path'])} | {s['age']:g} | {s['median_pred']:.1f} | {s['agree']}/{s['runs']} | "
              f"{s['direction']} |" for s in suspects[:30]]
  if report.get("files"):
    lines.append("\n## Files\n")
    lines += [f"- {p}" for p in report["files"]]
  if report.get("skipped"):
    lines.append("\n## Skipped\n")
    lines += [f"- {s}" for s in report["skipped"]]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m agejax.reports.diagnostics", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--gross", type=float, default=DEFAULTS["gross"], help="gross error threshold (years)")
  p.add_argument("--band", type=float, nargs=2, default=DEFAULTS["band"], help="error band of the second gallery")
  p.add_argument("--suspect-error", type=float, default=DEFAULTS["suspect_error"])
  p.add_argument("--min-agree", type=int, default=0, help="runs that must agree (0: automatic)")
  p.add_argument("--no-near", action="store_true", help="skip the perceptual-hash near-duplicate search")
  p.add_argument("--no-tensorboard", action="store_true")
  args = p.parse_args(argv)
  if not os.path.isdir(args.workdir):
    print(f"error: {args.workdir} is not a directory", file=sys.stderr)
    return 1
  logger = None if args.no_tensorboard else Logger(os.path.join(args.workdir, "tb"), enabled=True)
  options = {"gross": args.gross, "band": tuple(args.band), "suspect_error": args.suspect_error,
             "min_agree": args.min_agree, "near": not args.no_near}
  try:
    report = run_diagnostics(args.workdir, logger=logger, options=options)
  except (AgejaxError, OSError, ValueError) as e:  # a malformed or unreadable file of the workdir, named
    print(f"error: {e}", file=sys.stderr)
    return 1
  finally:
    if logger is not None:
      logger.close()
  print(report_markdown(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
