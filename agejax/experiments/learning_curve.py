"""The few-shot learning curve (paper §4.1, Tables 1-2, Fig. 4): for each prior and training-set size,
T trials fine-tuned from the prior on disjoint random draws, evaluated on one fixed test set.

`run(config, workdir)` is the driver and reads top to bottom: the workdir is prepared and its inputs written
(agejax.reports.workdir), the data loaded once; then for each prior entry: its own config and data view, the
prior resolved (pre-trained first if the entry asks), its programs (engines.engine_for); then for each pending
size (plan.pending_sizes, UNTOUCHED first): the trials' records and training lists (plan), training
(size_loop.train_size), the rows appended to results.csv, logged and sent to TensorBoard; last the reports.

Outputs in the workdir: results.csv (a row per trial), table.md, learning_curve.png, splits/ (every
trial's training list), config.json, data_report.json, conv_plan.json (the convolution implementation
each layer used, followed again by a rerun in the same workdir), tb/ (TensorBoard), checkpoints/ (the best and
median trial of each size as prior directories, usable by `agejax.predict`), ckpt/ (checkpoints inside
the size being trained, agejax.engine.checkpoint). A rerun of the same command skips the (prior, size)
pairs already in results.csv and resumes an interrupted size from its latest checkpoint. Groups of trials
are sharded over the devices of `config.mesh` (agejax.parallel.sharding).
"""

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax.engine import memory as memory_lib
from agejax.engine import metrics as metrics_lib
from agejax.errors import ConfigError
from agejax.experiments import plan
from agejax.experiments.engines import PriorEngine, engine_for, frozen_inputs
from agejax.experiments.priors import Prior, resolve_prior
from agejax.experiments.size_loop import SizeJob, check_stop, clear_checkpoints, train_size, untouched_row
from agejax.experiments.study_data import StudyData, check_view, data_view, load_study_data
from agejax.parallel import sharding as sharding_lib
from agejax.reports import plots, tables
from agejax.reports import workdir as workdir_lib
from agejax.reports.tensorboard import StudyBoard, study_hparams

log = logging.getLogger(__name__)

# What a prior entry's own `optim` may set (agejax.engine.optim.make_optimizer reads these).
OPTIM_FIELDS = ("name", "base_lr", "momentum", "weight_decay", "gamma", "rules")


def prior_config(cfg: Any, entry: Mapping[str, Any]) -> Any:
  """The study config as one prior sees it: `entry['optim']` merged into `cfg.optim` (its own solver: name,
  base_lr, rules...) and `entry['data']` into `cfg.data` (its own framing of the same images:
  study_data.VIEW_FIELDS). An entry with neither returns `cfg` itself."""
  name = entry.get("name")
  optim, view = dict(entry.get("optim") or {}), dict(entry.get("data") or {})
  if not optim and not view:
    return cfg
  unknown = sorted(set(optim) - set(OPTIM_FIELDS))
  if unknown:
    raise ConfigError(f"priors[{name}].optim: unknown field(s) {', '.join(unknown)}; known: {', '.join(OPTIM_FIELDS)}")
  check_view(view, f"priors[{name}].data")
  out = cfg.copy_and_resolve_references()
  for section, own in (("optim", optim), ("data", view)):
    with out[section].unlocked():
      out[section].update(own)
  return out


@dataclasses.dataclass
class Study:
  """What every prior and size of one study shares; the engine and feature-cache dicts fill as priors need them."""

  cfg: Any  # the study's config (a prior's own view of it: prior_config)
  workdir: str
  data: StudyData
  dev: dict[str, Any]  # the study's images and ages on the device
  sizes: list[plan.SizePlan]
  tb: StudyBoard
  rerun: bool  # the workdir already held this config's results
  done: set[tuple[str, int]]  # the (prior, size) pairs results.csv held when the study started
  engines: dict[str, PriorEngine] = dataclasses.field(default_factory=dict)  # by engines.engine_key
  caches: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # frozen-prefix feature caches
  is_main: bool = dataclasses.field(default_factory=lambda: jax.process_index() == 0)

  @property
  def results_path(self) -> str:
    return os.path.join(self.workdir, "results.csv")

  @property
  def chunk_steps(self) -> int:
    """One chunk length for the whole study, so one compiled program serves every size."""
    return plan.study_chunk_steps(self.sizes, self.cfg.trials.chunk_steps)

  @property
  def shared_bytes(self) -> int:
    return memory_lib.tree_bytes(self.dev)

  @property
  def pool_mean_mae(self) -> float:
    """The baseline of predicting the pool's mean age for every test image."""
    return metrics_lib.mae(np.full_like(self.data.test_ages, self.data.pool_ages.mean()), self.data.test_ages)


def write_inputs(workdir: str, cfg: Any, data: StudyData) -> None:
  """config.json, data_report.json, data_info.json and the fixed test list (process 0)."""
  workdir_lib.write_config(workdir, cfg)
  workdir_lib.write_data_files(workdir, data.rejections, data.info)
  workdir_lib.write_test_split(workdir, data.test_names, data.test_ages)


def open_study(cfg: Any, workdir: str, engines: dict[str, PriorEngine] | None = None) -> Study:
  """Prepares the workdir, loads the data, writes the inputs and opens TensorBoard."""
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  # Before anything is written: a workdir holding another config's results stops here, naming the fields.
  rerun = workdir_lib.prepare_workdir(workdir, cfg) if is_main else False
  data = load_study_data(cfg.data, cfg.seed)
  if is_main:
    write_inputs(workdir, cfg, data)
  dev = {"pool_images": jnp.asarray(data.pool_images), "pool_ages": jnp.asarray(data.pool_ages),
         "test_images": jnp.asarray(data.test_images)}
  sizes = plan.size_schedule(cfg.sizes, data.num_bases, cfg.steps_scale, cfg.min_steps)
  if not cfg.priors:
    raise ConfigError("config.priors is empty: add at least one prior (a prior directory or a model spec)")
  done = done_pairs(os.path.join(workdir, "results.csv"))
  tb = StudyBoard(os.path.join(workdir, "tb"), enabled=is_main, trial_losses=cfg.log_trial_losses)
  tb.layout([str(dict(e).get("name")) for e in cfg.priors], [s.n for s in sizes])
  return Study(cfg, workdir, data, dev, sizes, tb, rerun, done, {} if engines is None else engines, is_main=is_main)


def done_pairs(results_path: str) -> set[tuple[str, int]]:
  """The (prior, size) pairs already in results.csv."""
  if not os.path.exists(results_path):
    return set()
  return {(r["prior"], int(r["n_train"])) for r in tables.read_results(results_path)}


def pending_for(study: Study, name: str) -> list[plan.SizePlan]:
  """The prior's sizes still to run (a rerun logs what it skips)."""
  done = sorted(n for p, n in study.done if p == name)
  todo = plan.pending_sizes(study.sizes, done, size_zero=study.cfg.eval_size_zero)
  if study.rerun:
    log.info("prior %s: rerun skips the sizes already in results.csv (%s); to do: %s", name,
             ", ".join(map(str, done)) or "none", ", ".join(str(s.n) for s in todo) or "none")
  return todo


def prior_view(study: Study, cfg: Any) -> tuple[StudyData, dict[str, Any]]:
  """The study's data and device arrays as the prior frames them (its own data view, else the study's)."""
  data = data_view(study.data, study.cfg.data, cfg.data)
  if data is study.data:
    return data, study.dev
  return data, {**study.dev, "pool_images": jnp.asarray(data.pool_images), "test_images": jnp.asarray(data.test_images)}


def pretrained_entry(study: Study, entry: dict[str, Any]) -> dict[str, Any]:
  """The entry itself, or with `pretrain` the prior directory its pre-training stage produced (or reuses)."""
  if not entry.get("pretrain"):
    return entry
  from agejax.experiments.pretrain import pretrain_prior

  return {"name": entry["name"], "dir": pretrain_prior(entry, study.cfg, study.workdir, study.data.pool_ages),
          "head": "keep", "backbone_overrides": entry.get("backbone_overrides", {})}


def size_job(study: Study, cfg: Any, trials: Any, data: StudyData, dev: dict[str, Any],
             size: plan.SizePlan) -> SizeJob:
  """A size's trials drawn (plan) and their training lists written (splits/), ready to train."""
  name = trials.prior.name
  records = plan.trial_records(size, cfg.seed, data.group_members(), data.pool_names,
                               plan.base_ages(data.pool_groups, data.pool_ages), cfg.batch_size,
                               trials.engine.chunk_steps, name)
  split_files = [workdir_lib.write_trial_split(study.workdir, name, size.n, r.trial, r.split_text)
                 if study.is_main else "" for r in records]
  return SizeJob(cfg, study.workdir, trials, data, dev, size, records, split_files, study.is_main)


def record_size(study: Study, prior: Prior, rows: list[dict[str, Any]]) -> None:
  """Appends a size's rows to results.csv, logs their mean metrics and updates TensorBoard (process 0)."""
  tables.append_results(study.results_path, rows)
  summary = metrics_lib.format_metrics({k: float(np.mean([r[k] for r in rows])) for k in metrics_lib.METRIC_NAMES})
  log.info("%s n=%d (%d trials): %s", prior.name, rows[0]["n_train"], len(rows), summary)
  head = f"{prior.spec['head']} ({'new' if prior.new_head else 'kept'})"
  study.tb.size_done(prior.name, rows, study_hparams(study.cfg, prior.name, head, rows))
  study.tb.curve(tables.read_results(study.results_path), baselines={"predict the pool mean": study.pool_mean_mae})


def run_prior(study: Study, entry: dict[str, Any]) -> None:
  """Every pending size of one prior entry: its config and data view, the prior, its programs, the sizes."""
  cfg = prior_config(study.cfg, entry)  # the study's config with this prior's own optim and data view
  data, dev = prior_view(study, cfg)
  entry = pretrained_entry(study, entry)
  todo = pending_for(study, entry.get("name") or "prior")
  if not todo:
    return
  prior = resolve_prior(entry, study.cfg.model, study.cfg.data.crop, study.cfg.seed)
  log.info("prior %s: %s head=%s (%s)", prior.name, prior.spec["arch"], prior.spec["head"],
           "new" if prior.new_head else "kept")
  dev = frozen_inputs(study.caches, cfg, entry, prior, data, dev, study.shared_bytes,
                      study.is_main and cfg.progress)  # freeze: cached features for images
  trials = engine_for(study.engines, cfg, study.workdir, prior, study.chunk_steps, study.shared_bytes,
                      dev.get("frozen"))
  for size in todo:
    check_stop(prior.name, size.n)
    if size.untouched:
      rows = [untouched_row(cfg, trials, data, dev)]
    else:
      rows = train_size(size_job(study, cfg, trials, data, dev, size), study.tb)
    if study.is_main:
      record_size(study, prior, rows)
    clear_checkpoints(cfg, study.workdir, prior.name, rows[0]["n_train"])


def write_reports(study: Study) -> None:
  """table.md, learning_curve.png, TensorBoard's table and the diagnostics (process 0)."""
  rows = tables.read_results(study.results_path)
  tables.write_tables(study.workdir, rows, title=study.cfg.title)
  baselines = {"predict the pool mean": study.pool_mean_mae}
  plots.plot_learning_curve(rows, os.path.join(study.workdir, "learning_curve.png"), baselines=baselines)
  with open(os.path.join(study.workdir, "table.md")) as f:
    study.tb.text("table", f.read(), 0)
  if study.cfg.diagnostics:  # split and resampled-source histograms (Fig. 3), duplicates: diagnostics/
    from agejax.reports.diagnostics import run_diagnostics

    run_diagnostics(study.workdir, logger=study.tb, split_ages={"pool": study.data.pool_ages,
                                                                 "test": study.data.test_ages})


def run(config: Any, workdir: str, engines: dict[str, PriorEngine] | None = None) -> list[dict[str, Any]]:
  """Runs the learning-curve study of `config` in `workdir`; returns all result rows. `engines` (a dict, filled
  in place) lets a caller inspect the compiled engines afterwards."""
  study = open_study(config, workdir, engines)
  for entry in config.priors:
    run_prior(study, dict(entry))
  if study.is_main:
    write_reports(study)
  sharding_lib.barrier("study:end")  # process 0 has written every output
  study.tb.close()
  return tables.read_results(study.results_path)
