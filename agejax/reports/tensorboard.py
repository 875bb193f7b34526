"""TensorBoard logging that only the first JAX process performs; on every other process each call is a no-op.

`Logger` writes one run. `StudyBoard` lays out a study's `tb/` so the dashboards read well:

  tb/                 the root run: custom-scalars layout, `learning_curve` image (refreshed after each size),
                      the results table (text) and the diagnostics
  tb/PRIOR/           one run per prior: test/mae, test/mae_sd, test/cs5, test/plcc, test/srocc, test/baseline_mae
                      (step = n_train, so the priors overlay in one chart), histograms test/trial_mae and
                      test/residuals (step = n_train), per-step losses train_loss/PRIOR/nN/trialTT, .../mean
                      and its +- SD band train_loss_band/PRIOR/nN/{lower,upper} (step = optimiser step within the
                      size), pretrain/* of the prior's pre-training stage
  tb/hparams/PRIOR/nN one hparams session per (prior, size): the hparams tab's table and parallel coordinates
  tb/RUN/             (transfer study) one run per backbone and mode: train/loss per step, val/mae, test/*
"""

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from agejax.reports.tables import TABLE_DDOF


def figure_to_array(fig: Figure) -> np.ndarray:
  """Renders a matplotlib figure to an HWC uint8 RGB array on the Agg canvas (no pyplot involved)."""
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _as_hwc_uint8(image: ArrayLike | str | os.PathLike) -> np.ndarray:
  """An image file path, or an HW / HWC array (uint8, or float in [0, 1]), as HWC uint8 with 1, 3 or 4 channels."""
  if isinstance(image, str | os.PathLike):
    from PIL import Image

    with Image.open(image) as img:
      array = np.asarray(img.convert("RGBA" if "A" in img.getbands() else "RGB"))
  else:
    array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got shape {array.shape}")
  if array.dtype != np.uint8:
    array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
  return array


def _tensor_proto(value: Any) -> Any:
  """A TensorProto of a float array (as float32 for a scalar, float64 otherwise) or of a list of bytes."""
  from tensorboardX.proto.tensor_pb2 import TensorProto
  from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

  if isinstance(value, list):
    return TensorProto(dtype=7, string_val=value, tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(
        size=len(value))]))  # DT_STRING
  value = np.asarray(value)
  shape = TensorShapeProto(dim=[TensorShapeProto.Dim(size=d) for d in value.shape])
  if value.ndim == 0:
    return TensorProto(dtype=1, float_val=[float(value)], tensor_shape=shape)  # DT_FLOAT
  return TensorProto(dtype=2, double_val=value.ravel().tolist(), tensor_shape=shape)  # DT_DOUBLE


class Logger:
  """A thin wrapper over tensorboardX's SummaryWriter, active only where jax.process_index() == 0.

  `enabled=None` decides by process index; pass True/False to force it. Usable as a context manager.
  """

  def __init__(self, logdir: str | os.PathLike, enabled: bool | None = None, flush_secs: int = 30):
    self.logdir = Path(logdir)
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self._writer = None
    self._described: set[str] = set()
    if self.enabled:
      from tensorboardX import SummaryWriter

      self.logdir.mkdir(parents=True, exist_ok=True)
      self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=flush_secs)

  def _write(self, summary: Any, step: int, description: str, plugin: str, tensor: Any) -> None:
    """Writes a one-value Summary. A tag's first value with a description is written in the tensor form
    (`tensor`, tagged with `plugin`), the only one whose description TensorBoard's data server keeps."""
    value = summary.value[0]
    if description and value.tag not in self._described:
      from tensorboardX.proto.summary_pb2 import Summary

      self._described.add(value.tag)
      value = Summary.Value(tag=value.tag, tensor=tensor())
      value.metadata.summary_description = description
      value.metadata.plugin_data.plugin_name = plugin
      summary = Summary(value=[value])
    self._writer.file_writer.add_summary(summary, int(step))

  def scalar(self, tag: str, value: Any, step: int, description: str = "") -> None:
    """Logs one number (Python, numpy or a fetched JAX scalar); `description` shows under the card's (i) icon."""
    if self._writer is not None:
      from tensorboardX.summary import scalar

      value = float(value)
      self._write(scalar(tag, value), step, description, "scalars", lambda: _tensor_proto(np.float32(value)))

  def histogram(self, tag: str, values: ArrayLike, step: int, description: str = "") -> None:
    """Logs the distribution of `values` (any shape; non-finite values dropped)."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if self._writer is not None and values.size:
      from tensorboardX.summary import histogram

      def buckets():  # TensorBoard's tensor form: rows of (left edge, right edge, count)
        counts, edges = np.histogram(values, bins=min(30, max(1, values.size)))
        return _tensor_proto(np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1))

      self._write(histogram(tag, values, "auto"), step, description, "histograms", buckets)

  def scalars(self, tag_prefix: str, values: dict[str, Any], step: int) -> None:
    """Logs each numeric entry as '<tag_prefix>/<key>'; None and non-numeric values are skipped."""
    for key, value in values.items():
      if isinstance(value, bool) or value is None:
        continue
      if isinstance(value, int | float | np.number) or (hasattr(value, "shape") and np.ndim(value) == 0):
        self.scalar(f"{tag_prefix}/{key}" if tag_prefix else key, value, step)

  def image(self, tag: str, image: ArrayLike | str | os.PathLike, step: int, description: str = "") -> None:
    """Logs an HWC uint8 array (or HW, or float in [0, 1]) or a PNG/JPEG file."""
    if self._writer is not None:
      from tensorboardX.summary import image as image_summary

      summary = image_summary(tag, _as_hwc_uint8(image), dataformats="HWC")
      png = summary.value[0].image
      self._write(summary, step, description, "images",
                  lambda: _tensor_proto([str(png.width).encode(), str(png.height).encode(), png.encoded_image_string]))

  def figure(self, tag: str, fig: Figure, step: int, description: str = "") -> None:
    """Logs a rendered matplotlib figure."""
    if self._writer is not None:
      self.image(tag, figure_to_array(fig), step, description)

  def text(self, tag: str, text: str, step: int) -> None:
    """Logs text (Markdown renders in TensorBoard's text tab), e.g. a results table."""
    if self._writer is not None:
      self._writer.add_text(tag, text, global_step=int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "Logger":
    return self

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               tb: TracebackType | None) -> None:
    self.close()


# What each metric tag means; `test/<key>` is the mean over a size's trials of results.csv's column <key>.
METRICS = {
  "mae": "test MAE (years), mean over the size's trials",
  "mae_sd": "SD over the size's trials of the test MAE (years; 0 for a single trial)",
  "cs5": "CS@5: share of test faces with |predicted - true age| <= 5 years, mean over trials",
  "plcc": "Pearson correlation of predicted and true test ages, mean over trials",
  "srocc": "Spearman rank correlation of predicted and true test ages, mean over trials",
  "baseline_mae": "test MAE (years) of predicting each trial's training-set mean age, mean over trials",
}
_STEP_N = " Step = n_train, the number of training faces (0: the prior untouched)."
_LOSS = ("the head's per-example training loss (softmax cross-entropy over age bins for a DEX head; the regression "
         "head's loss otherwise), mean over the batch")
HPARAM_METRICS = ("mae", "mae_sd", "cs5", "plcc", "srocc", "baseline_mae")


def _finite(value: Any) -> bool:
  return isinstance(value, int | float | np.number) and math.isfinite(float(value))


def size_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """The `test/*` values of one (prior, size) from its results.csv rows (NaN where a column has no finite value)."""
  out = {}
  for key in ("mae", "cs5", "plcc", "srocc", "baseline_mae"):
    values = [float(r[key]) for r in rows if _finite(r.get(key))]
    out[key] = float(np.mean(values)) if values else math.nan
  maes = [float(r["mae"]) for r in rows if _finite(r.get("mae"))]
  out["mae_sd"] = float(np.std(maes, ddof=TABLE_DDOF)) if len(maes) > 1 else 0.0
  return out


def study_hparams(config: Any, prior: str, head: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The hparams of one (prior, size): prior, head, n, trials, steps, lr, strategy, freeze."""
  first = rows[0]
  return {"prior": prior, "head": str(head), "n": int(first["n_train"]), "trials": len(rows),
          "steps": int(first.get("steps") or 0), "lr": float(config.optim.base_lr),
          "strategy": str(first.get("strategy") or "none"), "freeze": str(config.trials.freeze)}


def trial_tag(prior: str, n: int, trial: int | None = None) -> str:
  """The loss tag of a trial of (prior, size), or of their mean when `trial` is None."""
  return f"train_loss/{prior}/n{n}/" + ("mean" if trial is None else f"trial{trial:02d}")


class StudyBoard(Logger):
  """A study's tb/: this Logger is the root run; `run(name)` is the sub-run tb/name/ (one per prior, or per
  transfer run), opened on first use. See the module docstring for the layout and tags."""

  def __init__(self, logdir: str | os.PathLike, enabled: bool | None = None, flush_secs: int = 30,
               trial_losses: bool = True):
    super().__init__(logdir, enabled, flush_secs)
    self.flush_secs, self.trial_losses = flush_secs, trial_losses
    self._runs: dict[str, Logger] = {}

  def run(self, name: str) -> Logger:
    """The sub-run tb/name/ (a disabled Logger on processes other than 0)."""
    if name not in self._runs:
      self._runs[name] = Logger(self.logdir / name, enabled=self.enabled, flush_secs=self.flush_secs)
    return self._runs[name]

  def layout(self, priors: Sequence[str], sizes: Sequence[int]) -> None:
    """The custom-scalars page: a margin chart (test MAE mean +- SD, a line per prior) and, per (prior, size),
    one chart of every trial's loss and their mean."""
    if self._writer is None:
      return
    layout = {"learning curve": {"test MAE mean +- SD (step = n_train)": ["Margin", ["test/mae", "test/mae_lower",
                                                                                      "test/mae_upper"]],
                                 "CS@5 (step = n_train)": ["Multiline", ["^test/cs5$"]]}}
    for prior in priors:  # a category (a row of charts) per size
      for n in (n for n in sizes if n > 0):
        band = f"train_loss_band/{prior}/n{n}/"
        layout[f"trials: {prior} n={n}"] = {
            f"{prior} n={n}: train loss of every trial and their mean": [
                "Multiline", [f"^{re.escape(f'train_loss/{prior}/n{n}/')}"]],
            f"{prior} n={n}: mean train loss +- SD over trials": [
                "Margin", [trial_tag(prior, n), band + "lower", band + "upper"]]}
    self._writer.add_custom_scalars(layout)

  def chunk_losses(self, prior: str, n: int, first_trial: int, step0: int, losses: ArrayLike) -> None:
    """Per-step losses of trials first_trial.. as a chunk finishes (losses [trials, steps]; step = step0 + 1..)."""
    if not self.trial_losses or self._writer is None:
      return
    losses = np.asarray(losses)
    board = self.run(prior)
    for i, row in enumerate(losses):
      tag, t = trial_tag(prior, n, first_trial + i), first_trial + i
      about = f"Trial {t} of {prior} at n_train={n}: {_LOSS}. Step = optimiser step within the size."
      for s, value in enumerate(row):
        board.scalar(tag, value, step0 + s + 1, about)

  def mean_losses(self, prior: str, n: int, step0: int, losses: ArrayLike) -> None:
    """Per-step mean over all the size's trials (losses [trials, steps]; step = step0 + 1..) and its +- SD band."""
    if self._writer is None:
      return
    board, losses = self.run(prior), np.asarray(losses, np.float64)
    sd = losses.std(axis=0, ddof=TABLE_DDOF) if len(losses) > 1 else np.zeros(losses.shape[1])
    about = f"the trials of {prior} at n_train={n}: {_LOSS}. Step = optimiser step within the size."
    for s, (mean, dev) in enumerate(zip(losses.mean(axis=0), sd)):
      board.scalar(trial_tag(prior, n), mean, step0 + s + 1, f"Mean over {about}")
      board.scalar(f"train_loss_band/{prior}/n{n}/lower", mean - dev, step0 + s + 1, f"Mean - SD over {about}")
      board.scalar(f"train_loss_band/{prior}/n{n}/upper", mean + dev, step0 + s + 1, f"Mean + SD over {about}")

  def residuals(self, prior: str, n: int, residuals: ArrayLike) -> None:
    """Histogram of pred - true test age (years) over every trial of a size, at step = n_train."""
    self.run(prior).histogram("test/residuals", residuals, n,
                              "Predicted minus true test age (years), every trial's every test face." + _STEP_N)

  def size_done(self, prior: str, rows: Sequence[Mapping[str, Any]], hparams: Mapping[str, Any] | None = None) -> None:
    """A finished (prior, size): test/* scalars, the histogram of per-trial MAE and, with `hparams`, its session."""
    if self._writer is None:
      return
    n = int(rows[0]["n_train"])
    board, values = self.run(prior), size_metrics(rows)
    for key, value in values.items():
      if math.isfinite(value):
        board.scalar(f"test/{key}", value, n, METRICS[key] + "." + _STEP_N)
    board.scalar("test/mae_lower", values["mae"] - values["mae_sd"], n, "test/mae - test/mae_sd (the band)." + _STEP_N)
    board.scalar("test/mae_upper", values["mae"] + values["mae_sd"], n, "test/mae + test/mae_sd (the band)." + _STEP_N)
    board.histogram("test/trial_mae", [r["mae"] for r in rows], n, "Test MAE (years) of each trial." + _STEP_N)
    board.flush()
    if hparams is not None:
      self.hparams(f"hparams/{prior}/n{n:05d}", hparams, values)

  def hparams(self, session: str, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """One hparams session (the run tb/session/): its hparams and its metrics as scalars `hparams/<key>`."""
    if self._writer is None:
      return
    from tensorboardX.summary import hparams as hparams_summaries

    metric_tags = {f"hparams/{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    with Logger(self.logdir / session, enabled=True) as board:
      for summary in hparams_summaries(dict(hparams), metric_tags):
        board._writer.file_writer.add_summary(summary)
      for tag, value in metric_tags.items():
        board.scalar(tag, value, int(hparams.get("n", 0)), METRICS.get(tag.split("/", 1)[1], tag))

  def curve(self, rows: Sequence[Mapping[str, Any]], baselines: Mapping[str, float] | None = None) -> None:
    """The learning-curve figure (log x, trial points, SD bands) of results.csv's `rows` as image `learning_curve`,
    at step = the number of (prior, size) pairs in `rows`."""
    if self._writer is None:
      return
    from agejax.reports.plots import learning_curve_figure

    step = len({(r["prior"], int(r["n_train"])) for r in rows})
    self.figure("learning_curve", learning_curve_figure(rows, baselines=baselines), step,
                "The learning curve so far: test MAE against n_train (log axis), a point per trial, mean +- SD "
                "band per prior. Step = how many (prior, size) pairs had finished.")
    self.flush()

  def flush(self) -> None:
    super().flush()
    for board in self._runs.values():
      board.flush()

  def close(self) -> None:
    super().close()
    for board in self._runs.values():
      board.close()


def fit_logging(board: Logger, prefix: str, about: str) -> tuple[Callable[[int, np.ndarray], None],
                                                                  Callable[[dict, bool, Any], None]]:
  """(on_losses, on_eval) for `agejax.engine.fit.fit`: `{prefix}/loss` at every step (written at each validation
  interval), `{prefix}/val_mae` and `{prefix}/epoch` at each validation; step = optimiser step. `about` names the
  training in the descriptions, e.g. 'the pre-training stage of prior P'."""

  def on_losses(step0: int, losses: np.ndarray) -> None:
    for s, value in enumerate(losses):
      board.scalar(f"{prefix}/loss", value, step0 + s + 1,
                   f"Training loss of {about}: {_LOSS}. Step = optimiser step.")

  def on_eval(record: dict, _improved: bool, _state: Any) -> None:
    if "val_mae" in record:
      board.scalar(f"{prefix}/val_mae", record["val_mae"], record["step"],
                   f"Validation MAE (years) of {about}. Step = optimiser step.")
    board.scalar(f"{prefix}/epoch", record["epoch"], record["step"],
                 f"Epochs (passes over the training set) of {about} done. Step = optimiser step.")
    board.flush()

  return on_losses, on_eval
