"""Figures: the learning curve (paper Fig. 4), predicted-vs-true scatter (transfer report) and age histograms (Fig. 3).

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot, so nothing depends on
a display or on global figure state. Each `*_figure` function returns the Figure (to log it to TensorBoard or
test it); each `plot_*` function saves that figure as a PNG and returns the path.
"""

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator
from numpy.typing import ArrayLike

from agejax.engine.metrics import mae, plcc, srocc
from agejax.reports.tables import METRIC_LABELS, latest_trials, priors_in_order, summarize

_STYLE = {
  "font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 10, "xtick.labelsize": 10,
  "ytick.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
}
_UNITS = {"mae": "MAE (years)", "eps_error": "ε-error", "cs5": "CS@5 (share with |error| ≤ 5 years)"}
TRIAL_GID = "trials"


def _new_figure(width: float, height: float, nrows: int = 1, sharex: bool = False) -> tuple[Figure, Any]:
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
  return fig, axes if nrows > 1 else axes[0]


def _save(fig: Figure, path: str | os.PathLike) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=150, format="png")
  return path


def learning_curve_figure(rows: Sequence[Mapping[str, Any]], metric: str = "mae",
                          baselines: Mapping[str, float] | None = None, title: str | None = None,
                          priors: Sequence[str] | None = None) -> Figure:
  """Metric against training-set size on a log axis, like the paper's Fig. 4.

  Every trial is a small point (scatter collections tagged with gid 'trials'); a line joins each prior's
  per-size means and a band shows ± one SD. Size 0, the untouched prior, sits left of a dotted break.
  """
  rows = [r for r in latest_trials(rows) if isinstance(r.get(metric), int | float) and math.isfinite(r[metric])]
  priors = list(priors) if priors is not None else priors_in_order(rows)
  sizes = sorted({int(r["n_train"]) for r in rows if int(r["n_train"]) > 0})
  zero_x = sizes[0] / 2.5 if sizes else 1.0
  xpos = lambda n: float(n) if n > 0 else zero_x
  summary = summarize(rows, (metric,))
  rng = np.random.default_rng(0)
  with matplotlib.rc_context(_STYLE):
    fig, ax = _new_figure(8.0, 5.0)
    ax.set_xscale("log")
    for i, prior in enumerate(priors):
      color = f"C{i % 10}"
      mine = [r for r in rows if str(r["prior"]) == prior]
      shift = 1.035 ** (i - (len(priors) - 1) / 2)  # keeps priors' points apart at a shared size
      px = np.array([xpos(int(r["n_train"])) for r in mine]) * shift * np.exp(rng.uniform(-0.02, 0.02, len(mine)))
      ax.scatter(px, [r[metric] for r in mine], s=9, color=color, alpha=0.35, linewidths=0, gid=TRIAL_GID,
                 zorder=2)
      stats = sorted((n, s[metric]) for (p, n), s in summary.items() if p == prior)
      if not stats:
        continue
      x = np.array([xpos(n) for n, _ in stats])
      mean = np.array([m for _, (m, _, _) in stats])
      sd = np.nan_to_num(np.array([s for _, (_, s, _) in stats]))
      ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.15, linewidth=0, zorder=1)
      ax.plot(x, mean, "-o", color=color, lw=2, ms=4.5, label=prior, zorder=3)
    for j, (name, value) in enumerate((baselines or {}).items()):
      ax.axhline(value, ls=(0, (5, 3)), lw=1.3, color=str(0.2 + 0.2 * (j % 3)), label=name, zorder=0)
    ticks = ([zero_x] if any(int(r["n_train"]) == 0 for r in rows) or not sizes else []) + [float(n) for n in sizes]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter(["0" if t == zero_x else str(int(t)) for t in ticks]))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 10:
      ax.tick_params(axis="x", labelrotation=45)
    if sizes:
      ax.axvline(math.sqrt(zero_x * sizes[0]), color="0.6", ls=":", lw=1)
      ax.set_xlim(zero_x / 1.4, sizes[-1] * 1.4)
    else:
      ax.set_xlim(zero_x / 3, zero_x * 3)
    ax.grid(True, axis="y", alpha=0.3)
    ax.grid(True, axis="x", alpha=0.15)
    ax.set_xlabel("training images (log scale; 0 = prior without fine-tuning)")
    ax.set_ylabel(_UNITS.get(metric, METRIC_LABELS.get(metric, metric)))
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} after fine-tuning vs training-set size")
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], ls="", marker="o", ms=4, color="0.4", alpha=0.5, label="single trials"))
    handles.append(Patch(color="0.4", alpha=0.15, label="mean ± SD"))
    ax.legend(handles=handles, loc="best")
  return fig


def plot_learning_curve(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, metric: str = "mae",
                        baselines: Mapping[str, float] | None = None, title: str | None = None) -> Path:
  """Saves learning_curve_figure as a PNG at path."""
  return _save(learning_curve_figure(rows, metric, baselines, title), path)


def scatter_figure(pred: ArrayLike, true: ArrayLike, highlight_error: float | None = 40,
                   title: str | None = None) -> Figure:
  """Predicted against true age with y = x, a least-squares line, and gross errors (|error| >= threshold) in red."""
  p = np.asarray(pred, dtype=np.float64).ravel()
  t = np.asarray(true, dtype=np.float64).ravel()
  gross = np.abs(p - t) >= highlight_error if highlight_error is not None else np.zeros(p.shape, bool)
  lo = min(0.0, float(np.min(p, initial=0)), float(np.min(t, initial=0))) - 2
  hi = max(100.0, float(np.max(p, initial=0)), float(np.max(t, initial=0))) + 2
  with matplotlib.rc_context(_STYLE):
    fig, ax = _new_figure(6.0, 6.0)
    alpha = float(np.clip(300 / max(p.size, 1), 0.15, 0.8))
    ax.scatter(t[~gross], p[~gross], s=8, color="C0", alpha=alpha, linewidths=0, label="test images")
    if highlight_error is not None:
      ax.scatter(t[gross], p[gross], s=20, color="C3", alpha=0.9, linewidths=0,
                 label=f"|error| ≥ {highlight_error:g} years ({int(gross.sum())})")
    ax.plot([lo, hi], [lo, hi], ls="--", color="0.5", lw=1, label="y = x")
    if p.size > 1 and np.ptp(t) > 0 and np.all(np.isfinite(p)):
      slope, intercept = np.polyfit(t, p, 1)
      ax.plot([lo, hi], [slope * lo + intercept, slope * hi + intercept], color="C1", lw=2,
              label=f"fit: y = {slope:.2f}x {'+' if intercept >= 0 else '−'} {abs(intercept):.1f}")
    if p.size:
      ax.text(0.03, 0.97, f"n = {p.size}\nMAE = {mae(p, t):.2f}\nPLCC = {plcc(p, t):.3f}\nSROCC = {srocc(p, t):.3f}",
              transform=ax.transAxes, va="top", ha="left", fontsize=10,
              bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.8"})
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("predicted age (years)")
    ax.set_title(title or "Predicted vs true age")
    legend = ax.legend(loc="lower right")
    for handle in legend.legend_handles:
      handle.set_alpha(1.0)
  return fig


def plot_scatter(pred: ArrayLike, true: ArrayLike, path: str | os.PathLike, highlight_error: float | None = 40,
                 title: str | None = None) -> Path:
  """Saves scatter_figure as a PNG at path."""
  return _save(scatter_figure(pred, true, highlight_error, title), path)


def age_histograms_figure(named_ages: Mapping[str, ArrayLike], density: bool = True, panels: bool = False,
                          title: str | None = None) -> Figure:
  """Age distributions over 0..100, one bin per year, overlaid (or one panel each with panels=True).

  With density=True each histogram shows the share of its images per age, so datasets of very different
  sizes (IMDB vs LAP) compare directly.
  """
  bins = np.arange(102) - 0.5
  names = list(named_ages)
  with matplotlib.rc_context(_STYLE):
    fig, axes = _new_figure(8.0, 2.2 * len(names) + 0.8 if panels else 4.5, len(names) if panels else 1,
                            sharex=True)
    axes = list(np.atleast_1d(axes)) if panels else [axes] * len(names)
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
      ages = np.asarray(named_ages[name], dtype=np.float64).ravel()
      color = f"C{i % 10}"
      ax.hist(ages, bins=bins, density=density, histtype="stepfilled", color=color, alpha=0.25, linewidth=0)
      ax.hist(ages, bins=bins, density=density, histtype="step", color=color, lw=1.5,
              label=f"{name} (n = {ages.size:,})")
      ax.set_ylabel("share of images" if density else "images")
      ax.grid(True, alpha=0.3)
      ax.legend(loc="upper right")
    axes[-1].set_xlim(-0.5, 100.5)
    axes[-1].set_xlabel("age (years)")
    axes[0].set_title(title or "Age distributions")
  return fig


def plot_age_histograms(named_ages: Mapping[str, ArrayLike], path: str | os.PathLike, density: bool = True,
                        panels: bool = False, title: str | None = None) -> Path:
  """Saves age_histograms_figure as a PNG at path."""
  return _save(age_histograms_figure(named_ages, density, panels, title), path)
