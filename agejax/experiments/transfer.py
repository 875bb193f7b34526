"""The transfer-learning study of the report (docs/protocol.md; report Table 2, Figs 4-8).

A dataset is split into train / validation / test (the report: the IMDB part of IMDB-WIKI, cleaned, half of
it, 21,568 / 7,183 / 7,183). Each backbone of `config.backbones` (ImageNet checkpoints ported by
`agejax.port`: MobileNetV2, EfficientNet-B3, EfficientNet-Lite0, ...) gets the three-layer GELU regression
head and is fine-tuned in each mode of `config.modes`:
  frozen  only the head trains; the backbone runs in inference mode (BatchNorm running statistics);
  full    every layer trains.
Adam with a step-decayed learning rate (`config.lr[mode]`, `optim.gamma` every `lr_decay_epochs`), MAE loss,
validation after every epoch, the best epoch's weights kept (optionally early stopping after `patience`
epochs without improvement), then test MAE, PLCC and SROCC.

Outputs in the workdir: results.csv (a row per backbone and mode), table.md (laid out like the report's
Table 2), predictions.csv (every test image's true and predicted age per run), checkpoints/RUN/ (the best
weights as a prior directory, usable by `agejax.predict`), splits/{train,val,test}.txt, config.json,
data_info.json, data_report.json, tb/ (TensorBoard) and diagnostics/ (agejax.reports.diagnostics). A rerun
skips the runs already in results.csv.
"""

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agejax.engine import fit as fit_lib
from agejax.engine import metrics as metrics_lib
from agejax.engine import step as step_lib
from agejax.errors import ConfigError
from agejax.experiments.priors import resolve_prior
from agejax.experiments.study_data import StudyData, load_study_data
from agejax.models.pretrained import save_pretrained
from agejax.reports import diagnostics, tables
from agejax.reports import workdir as workdir_lib
from agejax.reports.tensorboard import StudyBoard, fit_logging

log = logging.getLogger(__name__)

MODES = ("frozen", "full")
RESULT_FIELDS = ("run", "backbone", "arch", "mode", "test_mae", "plcc", "srocc", "cs5", "val_mae", "best_epoch",
                 "epochs_run", "stopped_early", "train_images", "val_images", "test_images", "trainable_params",
                 "backbone_max_change", "train_wall_s", "checkpoint")
TEXT_FIELDS = ("run", "backbone", "arch", "mode", "checkpoint")  # read back from results.csv as str


@dataclasses.dataclass
class Split:
  """One split's images (uint8, resized), ages and names."""

  images: np.ndarray
  ages: np.ndarray
  names: list[str]


def split_pool(data: StudyData, val_size: int, train_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) pool item indices: `val_size` base images held out, the rest (capped) for training."""
  if val_size >= data.num_bases:
    raise ConfigError(f"config.data.val_size={val_size} leaves no training images (the pool has {data.num_bases})")
  order = np.random.default_rng([seed, 23]).permutation(data.num_bases)
  val_bases, train_bases = order[:val_size], order[val_size:]
  if train_size:
    train_bases = train_bases[:train_size]
  members = data.group_members()
  take = lambda bases: np.sort(np.concatenate([members[b] for b in bases]))  # noqa: E731
  return take(train_bases), take(val_bases)


def load_splits(cfg: ml_collections.ConfigDict, seed: int) -> tuple[dict[str, Split], StudyData]:
  """Train / val / test splits of `config.data` (test from the study split, val from the pool)."""
  data = load_study_data(cfg, seed)
  val_size = int(cfg.val_size or round(float(cfg.val_fraction) * data.num_bases))
  train_idx, val_idx = split_pool(data, val_size, int(cfg.train_size), seed)
  names = np.asarray(data.pool_names, dtype=object)[data.pool_groups]
  pool = lambda idx: Split(np.asarray(data.pool_images[idx]), data.pool_ages[idx], list(names[idx]))  # noqa: E731
  return {"train": pool(train_idx), "val": pool(val_idx),
          "test": Split(np.asarray(data.test_images), data.test_ages, list(data.test_names))}, data


def _check_backbones(cfg: Any) -> list[dict[str, Any]]:
  entries = [dict(e) for e in cfg.backbones]
  if not entries:
    raise ConfigError("config.backbones is empty: give at least one backbone prior directory (made by "
                      "`python -m agejax.port`), e.g. the config's mobilenet_v2=DIR / lite0=DIR argument")
  for e in entries:
    if not e.get("dir") and not e.get("model"):
      raise ConfigError(f"config.backbones[{e.get('name')}].dir is not set: point it at a prior directory made by "
                        "`python -m agejax.port` (or give a `model` spec)")
    if e.get("dir") and not os.path.isdir(e["dir"]):
      raise ConfigError(f"config.backbones[{e.get('name')}].dir={e['dir']!r} does not exist")
  bad = [m for m in cfg.modes if m not in MODES]
  if bad:
    raise ConfigError(f"config.modes has {bad}; expected a subset of {MODES}")
  return entries


def _has_batchnorm(entry: Mapping[str, Any]) -> bool:
  """Whether the entry's backbone has BatchNorm (a `bn_train` field) to put in inference mode when frozen."""
  from agejax.models.pretrained import read_prior_metadata
  from agejax.models.registry import BACKBONES

  spec = read_prior_metadata(entry["dir"])["model"] if entry.get("dir") else entry["model"]
  return "bn_train" in {f.name for f in dataclasses.fields(BACKBONES[spec["arch"]]())}


def _max_change(before: Any, after: Any) -> float:
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if np.size(a) else 0.0,
                       before, after)
  return max(jax.tree.leaves(diffs), default=0.0)


class TransferStudy:
  """Runs every (backbone, mode) of a config into a workdir."""

  def __init__(self, config: Any, workdir: str):
    self.cfg = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.results_path = os.path.join(workdir, "results.csv")
    self.predictions_path = os.path.join(workdir, diagnostics.PREDICTIONS_FILE)

  def write_inputs(self, splits: dict[str, Split], data: StudyData) -> None:
    workdir_lib.write_config(self.workdir, self.cfg)
    info = {**data.info, **{f"{k}_images": len(s.ages) for k, s in splits.items()}}
    workdir_lib.write_data_files(self.workdir, data.rejections, info)
    for name, s in splits.items():
      diagnostics.write_split(os.path.join(self.workdir, "splits", f"{name}.txt"), s.names, s.ages)

  def optim_config(self, mode: str) -> ml_collections.ConfigDict:
    optim = ml_collections.ConfigDict(self.cfg.optim.to_dict())
    lr = dict(self.cfg.lr)
    if mode in lr:
      optim.base_lr = float(lr[mode])
    return optim

  def fit_config(self, num_train: int) -> fit_lib.FitConfig:
    cfg = self.cfg
    per_epoch = max(1, math.ceil(num_train / cfg.batch_size))
    return fit_lib.FitConfig(
        batch_size=cfg.batch_size, crop=cfg.data.crop, epochs=float(cfg.epochs), mirror=cfg.data.mirror,
        random_crop=cfg.data.random_crop, patience=int(cfg.patience),
        stepsize=int(round(float(cfg.lr_decay_epochs) * per_epoch)), eval_batch_size=int(cfg.eval_batch_size))

  def train_one(self, entry: Mapping[str, Any], mode: str, splits: dict[str, Split], dev: dict[str, jax.Array],
                tb: StudyBoard) -> tuple[dict[str, Any], np.ndarray]:
    cfg = self.cfg
    run = f"{entry['name']}-{mode}"
    overrides = dict(entry.get("backbone_overrides", {}) or {})
    if mode == "frozen" and _has_batchnorm(entry):
      overrides["bn_train"] = False
    prior = resolve_prior({**entry, "name": run, "head": "new", "backbone_overrides": overrides}, cfg.model,
                          cfg.data.crop, cfg.seed)
    params = jax.tree.map(jnp.asarray, prior.variables["params"])
    start_backbone = jax.device_get(params["backbone"])
    optimizer = fit_lib.optimizer_for(self.optim_config(mode), params, mode)
    state = step_lib.init_state({**prior.variables, "params": params}, optimizer, cfg.seed)
    fcfg = self.fit_config(len(splits["train"].ages))

    board = tb.run(run)  # the run tb/RUN/: train/loss per step, train/val_mae, train/epoch, test/*
    on_losses, log_eval = fit_logging(board, "train", f"{run} ({mode} fine-tuning of {entry['name']})")

    def on_eval(record: dict, improved: bool, _state: Any) -> None:
      log_eval(record, improved, _state)
      log.info("%s epoch %.2f: train loss %.3f, val MAE %.3f%s", run, record["epoch"], record["train_loss"],
               record.get("val_mae", float("nan")), " (best)" if improved else "")

    result = fit_lib.fit(prior.model, prior.head_kind(), prior.preprocess, optimizer, state, fcfg, mode,
                         splits["train"].images, splits["train"].ages, np.arange(len(splits["train"].ages)),
                         dev["val_images"], splits["val"].ages, seed=cfg.seed, on_eval=on_eval, on_losses=on_losses,
                         progress=self.is_main and cfg.progress, desc=run)
    predict = jax.jit(step_lib.make_predict(prior.model, prior.head_kind(), prior.preprocess))
    test_pred = step_lib.predict_padded(functools.partial(predict, result.params, result.batch_stats),
                                        dev["test_images"], fcfg.eval_batch_size, cfg.data.crop)
    scores = metrics_lib.age_metrics(test_pred, splits["test"].ages)
    ckpt = os.path.join(self.workdir, "checkpoints", run)
    if self.is_main:
      variables = {"params": result.params, **({"batch_stats": result.batch_stats} if result.batch_stats else {})}
      save_pretrained(ckpt, prior.spec, variables, prior.preprocess,
                      source={"format": "agejax-transfer", "run": run, "mode": mode, "best_step": result.best_step,
                              "val_mae": result.best_val_mae, "test_mae": scores["mae"]})
    per_epoch = max(1, math.ceil(len(splits["train"].ages) / cfg.batch_size))
    row = {"run": run, "backbone": entry["name"], "arch": prior.spec["arch"], "mode": mode, "test_mae": scores["mae"],
           "plcc": scores["plcc"], "srocc": scores["srocc"], "cs5": scores["cs5"], "val_mae": result.best_val_mae,
           "best_epoch": result.best_step / per_epoch, "epochs_run": result.steps_run / per_epoch,
           "stopped_early": result.stopped_early, "train_images": len(splits["train"].ages),
           "val_images": len(splits["val"].ages), "test_images": len(splits["test"].ages),
           "trainable_params": sum(np.size(x) for x in jax.tree.leaves(fit_lib.trainable(result.params, mode))),
           "backbone_max_change": _max_change(start_backbone, result.params["backbone"]),
           "train_wall_s": round(result.wall_s, 2), "checkpoint": os.path.relpath(ckpt, self.workdir)}
    for key in ("test_mae", "plcc", "srocc", "cs5"):
      board.scalar(f"test/{key.removeprefix('test_')}", row[key], result.steps_run,
                   f"{run}: test {key.removeprefix('test_').upper()} of the best state. Step = optimiser steps run.")
    board.flush()
    log.info("%s: test %s", run, metrics_lib.format_metrics(scores))
    return row, test_pred

  def run(self) -> list[dict[str, Any]]:
    cfg = self.cfg
    entries = _check_backbones(cfg)
    splits, data = load_splits(cfg.data, cfg.seed)
    if self.is_main:
      self.write_inputs(splits, data)
    # Validation and test images live on the device; the training set goes as host arrays, so `fit` keeps it on
    # the device or reads it through Grain, by its memory estimate.
    dev = {f"{k}_images": jnp.asarray(s.images) for k, s in splits.items() if k != "train"}
    done = {r["run"] for r in tables.read_results(self.results_path, TEXT_FIELDS)}
    tb = StudyBoard(os.path.join(self.workdir, "tb"), enabled=self.is_main)
    for entry in entries:
      for mode in cfg.modes:
        if f"{entry['name']}-{mode}" in done:
          log.info("%s-%s: already in results.csv, skipped", entry["name"], mode)
          continue
        row, pred = self.train_one(entry, mode, splits, dev, tb)
        if self.is_main:
          tables.append_results(self.results_path, [row], RESULT_FIELDS)
          test = splits["test"]
          diagnostics.append_predictions(self.predictions_path, row["run"], test.names, test.ages, pred)
    rows = tables.read_results(self.results_path, TEXT_FIELDS)
    if self.is_main:
      table = tables.write_transfer_table(self.workdir, rows, cfg.title)
      tb.text("table", table, 0)
      if cfg.diagnostics:
        index = {name: i for i, name in enumerate(splits["test"].names)}
        lookup = lambda name: splits["test"].images[index[name]] if name in index else None  # noqa: E731
        diagnostics.run_diagnostics(self.workdir, image_lookup=lookup, logger=tb,
                                    split_ages={k: s.ages for k, s in splits.items()},
                                    options=dict(cfg.diagnostics_options))
    tb.close()
    return rows


def run(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Runs the transfer study of `config` in `workdir`; returns the result rows (one per backbone and mode)."""
  return TransferStudy(config, workdir).run()
