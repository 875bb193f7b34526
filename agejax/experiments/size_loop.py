"""Training one size of one prior: its trials group by group and chunk by chunk, and their result rows.

`train_size` owns everything inside a size: the strategy (measured, or the resumed checkpoint's), the groups of
the runner's layout, the chunk loop with its live TensorBoard losses and NaN check, checkpoints every
`config.checkpoint.every_chunks` chunks and at group ends (agejax.engine.checkpoint), resuming from the latest
one, SIGTERM preemption (a checkpoint, then `Preempted`), evaluation on the test set, the trials' final states
(keeper.TrialKeeper) and results.csv's rows. `untouched_row` evaluates a prior as it is (size 0).
"""

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from agejax.engine import checkpoint as checkpoint_lib
from agejax.engine import features as features_lib
from agejax.engine import metrics as metrics_lib
from agejax.engine import trials as trials_lib
from agejax.errors import TrainingError
from agejax.experiments.engines import PriorEngine, PriorTrials
from agejax.experiments.keeper import TrialKeeper
from agejax.experiments.plan import SizePlan, TrialRecord, padded_steps, stack_orders, trial_seed
from agejax.experiments.study_data import StudyData
from agejax.parallel import sharding as sharding_lib
from agejax.reports.tensorboard import StudyBoard

log = logging.getLogger(__name__)

TRAIN_LOSS_STEPS = 10  # results.csv's train_loss: a trial's mean loss over its last 10 steps


def final_train_loss(losses: np.ndarray, max_iter: int) -> float:
  """The mean of a trial's last TRAIN_LOSS_STEPS losses (all of them when it ran fewer steps); `losses` may run
  past `max_iter` (padded chunks), so it is defined the same whatever `trials.chunk_steps` is."""
  done = np.asarray(losses)[:max_iter]
  return float(done[-min(TRAIN_LOSS_STEPS, len(done)):].mean())


def _scores(pred: np.ndarray, data: StudyData) -> dict[str, float]:
  return metrics_lib.age_metrics(pred, data.test_ages, data.test_sigma)


@dataclasses.dataclass(frozen=True)
class SizeJob:
  """Everything fixed while one size of one prior trains."""

  cfg: Any  # the prior's config (its own optim and data view)
  workdir: str
  trials: PriorTrials
  data: StudyData
  dev: dict[str, Any]  # device arrays: pool_images, pool_ages, test_images (or a frozen prefix's features)
  size: SizePlan
  records: Sequence[TrialRecord]
  split_files: Sequence[str]  # each trial's training list, relative to the workdir ('' off process 0)
  is_main: bool

  @property
  def name(self) -> str:
    return self.trials.prior.name

  @property
  def engine(self) -> PriorEngine:
    return self.trials.engine

  def hyper(self) -> trials_lib.Hyper:
    return trials_lib.Hyper(jnp.asarray(self.size.stepsize, jnp.int32), jnp.asarray(self.size.max_iter, jnp.int32))

  def make_states(self, sl: slice) -> list[trials_lib.TrialState]:
    return [self.trials.initial_state(self.records[t].seed) for t in range(sl.start, sl.stop)]


@dataclasses.dataclass
class Progress:
  """A size's training so far: what a checkpoint saves and a resume restores."""

  losses: np.ndarray  # (trials, padded steps)
  preds: np.ndarray  # (trials, test images)
  chunks: int = 0  # chunks trained (the checkpoint step)
  train_wall: float = 0.0

  def host(self) -> dict[str, np.ndarray]:
    return {"losses": self.losses, "preds": self.preds}


@dataclasses.dataclass
class SizeRun:
  """A size being trained: its job, runner and group layout, checkpoints, keeper, progress bar and progress."""

  job: SizeJob
  runner: trials_lib.TrialRunner
  layout: Any  # sharding.GroupLayout
  ckpt: "checkpoint_lib.SizeCheckpoints | None"
  keeper: TrialKeeper | None
  bar: Any
  progress: Progress


# -- checkpoints and stopping ----------------------------------------------------------------------------
def checkpoint_dir(workdir: str, prior: str, n: int) -> str:
  return os.path.join(workdir, "ckpt", prior, f"n{n:05d}")


def size_checkpoints(cfg: Any, workdir: str, prior: str, size: SizePlan, chunk_steps: int,
                     freeze: str = "none") -> "checkpoint_lib.SizeCheckpoints | None":
  """The checkpoints of a size (None if `config.checkpoint.enabled` is off)."""
  config = checkpoint_lib.CheckpointConfig.from_config(cfg)
  if not config.enabled:
    return None
  mesh = sharding_lib.MeshConfig.from_config(cfg)
  fingerprint = dict(prior=prior, **size.as_dict(), chunk_steps=chunk_steps, batch_size=int(cfg.batch_size),
                     seed=int(cfg.seed), mesh=[mesh.trial, mesh.data], devices=jax.device_count(),
                     processes=jax.process_count(), save_trials=cfg.save_trials)
  if freeze != "none":  # a checkpoint of other trained variables must not be resumed
    fingerprint["freeze"] = freeze
  return checkpoint_lib.SizeCheckpoints(checkpoint_dir(workdir, prior, size.n), config, fingerprint)


def resume_point(cfg: Any, ckpt: "checkpoint_lib.SizeCheckpoints", keeper: TrialKeeper | None, engine: PriorEngine,
                 size: SizePlan) -> dict[str, Any] | None:
  """The latest usable checkpoint's metadata, or None to start the size over."""
  meta = ckpt.latest()
  if meta is None:
    return None
  groups = engine.runner(meta["strategy"]).layout(sharding_lib.MeshConfig.from_config(cfg), size.trials).slices
  finished = groups[meta["group"]].start if meta["group"] < len(groups) else size.trials
  kept = keeper.adopt(size.n, range(finished)) if keeper else True
  if not sharding_lib.any_process(not kept):
    return meta
  log.warning("checkpoint %s: the final states of finished trials are missing: starting the size over",
              ckpt.directory)
  return None


def stop_size(ckpt: "checkpoint_lib.SizeCheckpoints | None", prior: str, n: int, group: int, step: int) -> NoReturn:
  """Ends the run on request (SIGTERM) once the checkpoint just saved is written."""
  if ckpt:
    ckpt.close()
    where = f"checkpoint in {ckpt.directory}; rerun the same command to continue"
  else:
    where = "no checkpoint (config.checkpoint.enabled is off): the size starts over on a rerun"
  raise checkpoint_lib.Preempted(f"stopped on request at prior {prior!r}, size {n}, group {group}, step {step}: "
                                 f"{where}")


def check_stop(prior: str, n: int) -> None:
  """Ends the run on request between sizes (nothing to save: finished sizes are in results.csv)."""
  if checkpoint_lib.stop_requested():
    raise checkpoint_lib.Preempted(f"stopped on request before prior {prior!r}, size {n}; rerun the same command "
                                   "to continue")


def clear_checkpoints(cfg: Any, workdir: str, prior: str, n: int) -> None:
  """Deletes a size's checkpoints once its rows are in results.csv."""
  if n and checkpoint_lib.CheckpointConfig.from_config(cfg).enabled:
    checkpoint_lib.remove_checkpoints(checkpoint_dir(workdir, prior, n))


# -- strategy, keeper, progress ----------------------------------------------------------------------------
def pick_strategy(cfg: Any, engine: PriorEngine, make_states: Callable[[slice], list], first_chunk: np.ndarray,
                  hyper: trials_lib.Hyper, dev: dict[str, Any]) -> str:
  """config.trials.parallel, or with 'auto' the fastest candidate (measured once per engine)."""
  strategy, num_trials = cfg.trials.parallel, len(first_chunk)
  if strategy != "auto":
    return strategy
  if num_trials == 1:
    return "loop"
  if engine.auto_choice:  # measured once per engine, at its first size with several trials
    return engine.auto_choice
  key = trials_lib.auto_key(engine.spec, num_trials, engine.chunk_steps, dev["pool_images"].shape, engine.step_cfg,
                            engine.trial_chunk)
  pool, first_idx = features_lib.take_rows(dev["pool_images"], first_chunk)  # a host cache: the rows used

  def measure(name: str) -> float:
    return trials_lib.time_chunk(engine.runner(name), sharding_lib.MeshConfig.from_config(cfg), make_states,
                                 first_idx, hyper, pool, dev["pool_ages"])

  candidates = tuple(cfg.trials.auto_candidates or trials_lib.default_candidates())
  engine.auto_choice, _ = trials_lib.choose_strategy(key, measure, candidates, log)
  return engine.auto_choice


def make_keeper(job: SizeJob) -> TrialKeeper | None:
  """The keeper of the size's trial states (process 0, unless config.save_trials is 'none')."""
  if not job.is_main or job.cfg.save_trials == "none":
    return None
  trained_on = {"name": job.cfg.data.name, "synthetic": job.cfg.data.name == "synthetic"}
  frozen = job.trials.frozen
  return TrialKeeper(job.workdir, job.trials.prior, job.cfg.keep_states_mb, frozen.complete if frozen else None,
                     trained_on)


def restore_progress(job: SizeJob, ckpt: "checkpoint_lib.SizeCheckpoints | None", resume: dict[str, Any] | None,
                     num_groups: int) -> Progress:
  """Zeros, or the resumed checkpoint's losses, predictions, chunk count and training time."""
  steps = padded_steps(job.size.max_iter, job.engine.chunk_steps)
  fresh = Progress(np.zeros((job.size.trials, steps), np.float32),
                   np.zeros((job.size.trials, len(job.data.test_ages)), np.float32))
  if not resume:
    return fresh
  host = ckpt.restore_host(resume["step"], fresh.host())
  log.info("%s n=%d: resuming from checkpoint %d (group %d of %d, step %d) in %s", job.name, job.size.n,
           resume["step"], resume["group"] + 1, num_groups, resume["next_step0"], ckpt.directory)
  return Progress(host["losses"], host["preds"], resume["step"], resume["train_wall"])


def progress_bar(job: SizeJob, strategy: str, groups: Sequence[slice], resume: dict[str, Any] | None) -> Any:
  size = job.size
  bar = tqdm(total=size.max_iter * size.trials, desc=f"{job.name} n={size.n} x{size.trials} [{strategy}]",
             unit="step", disable=not job.is_main or not job.cfg.progress, leave=False)
  if resume and resume["group"] < len(groups):
    current = groups[resume["group"]]
    bar.update(size.max_iter * current.start + resume["next_step0"] * (current.stop - current.start))
  return bar


# -- the groups -----------------------------------------------------------------------------------------
def start_group(run: SizeRun, g: int, resume: dict[str, Any] | None) -> tuple[trials_lib.TrialState, int]:
  """Group g's stacked starting states and first step (the resumed checkpoint's, for its group)."""
  state = run.runner.group(run.job.make_states(run.layout.slices[g]), run.layout)
  if resume and g == resume["group"] and resume["has_state"]:
    return run.ckpt.restore_state(resume["step"], state), resume["next_step0"]
  return state, 0


def check_finite(job: SizeJob, losses: np.ndarray, first_trial: int, step0: int) -> None:
  """Stops on the first non-finite loss of a chunk (`losses`: its group's valid steps)."""
  if not np.isfinite(losses).all():
    t, s = map(int, np.argwhere(~np.isfinite(losses))[0])
    raise TrainingError(f"loss is {losses[t, s]} at prior {job.name!r}, size {job.size.n}, trial {first_trial + t} "
                        f"(seed {job.records[first_trial + t].seed}), step {step0 + s}; lower optim.base_lr or check "
                        "the data")


def train_group(run: SizeRun, g: int, state: trials_lib.TrialState, first: int, orders: np.ndarray,
                tb: StudyBoard) -> trials_lib.TrialState:
  """Group g's chunks from step `first`, checkpointing every `every_chunks` chunks and on a stop request."""
  job, p, sl = run.job, run.progress, run.layout.slices[g]
  k, max_iter, hyper = job.engine.chunk_steps, job.size.max_iter, job.hyper()
  t_train = time.perf_counter()
  for step0 in range(first, max_iter, k):
    pool, chunk_idx = features_lib.take_rows(job.dev["pool_images"], orders[sl][..., step0:step0 + k, :])
    state, chunk_losses = run.runner.train(state, chunk_idx, step0, hyper, pool, job.dev["pool_ages"])
    p.losses[sl, step0:step0 + k] = chunk_losses
    valid = chunk_losses[:, : max_iter - step0]
    tb.chunk_losses(job.name, job.size.n, sl.start, step0, valid)  # live: each chunk as it finishes
    if sl.stop == job.size.trials:  # the last group: every trial has these steps, so their mean is known
      tb.mean_losses(job.name, job.size.n, step0, p.losses[:, step0:min(step0 + k, max_iter)])
    check_finite(job, valid, sl.start, step0)
    run.bar.update(min(k, max_iter - step0) * (sl.stop - sl.start))
    p.chunks += 1
    if step0 + k >= max_iter:  # the group's last chunk: its end is saved by end_group
      break
    stop = checkpoint_lib.stop_requested()
    if run.ckpt and (stop or p.chunks % run.ckpt.config.every_chunks == 0):
      meta = dict(strategy=run.runner.strategy, group=g, next_step0=step0 + k,
                  train_wall=p.train_wall + time.perf_counter() - t_train)
      run.ckpt.save(p.chunks, meta, p.host(), state)
    if stop:
      stop_size(run.ckpt, job.name, job.size.n, g, step0 + k)
  jax.block_until_ready(state)
  p.train_wall += time.perf_counter() - t_train
  return state


def end_group(run: SizeRun, g: int, state: trials_lib.TrialState) -> None:
  """Evaluates group g, keeps its trials' states, and checkpoints the size between groups."""
  job, p, sl = run.job, run.progress, run.layout.slices[g]
  p.preds[sl] = trials_lib.evaluate(run.runner, state, job.dev["test_images"], job.engine.eval_crop,
                                    job.cfg.eval_batch_size, size=sl.stop - sl.start)
  if job.cfg.save_trials != "none":  # every process: a sharded group is gathered
    for t, st in zip(range(sl.start, sl.stop), run.runner.ungroup(state, sl.stop - sl.start)):
      if run.keeper:
        run.keeper.keep(t, job.size.n, st)
  del state
  if g + 1 < len(run.layout.slices):  # the last group's results are written right after
    stop = checkpoint_lib.stop_requested()
    if run.ckpt:
      if run.keeper:
        run.keeper.persist(job.size.n)
      run.ckpt.save(p.chunks, dict(strategy=run.runner.strategy, group=g + 1, next_step0=0, train_wall=p.train_wall),
                    p.host())
    if stop:
      stop_size(run.ckpt, job.name, job.size.n, g + 1, 0)


# -- a size ---------------------------------------------------------------------------------------------
def result_rows(job: SizeJob, strategy: str, p: Progress, wall: float) -> list[dict[str, Any]]:
  """results.csv's rows of a trained size, one per trial."""
  size, data = job.size, job.data
  rows = []
  for t, record in enumerate(job.records):
    train_mean = float(data.pool_ages[record.items].mean())
    rows.append({"prior": job.name, "n_train": size.n, "trial": t, "seed": record.seed, **_scores(p.preds[t], data),
                 "steps": size.max_iter, "wall_s": round(wall / size.trials, 4),
                 "train_loss": final_train_loss(p.losses[t, :size.max_iter], size.max_iter),
                 "baseline_mae": metrics_lib.mae(np.full_like(data.test_ages, train_mean), data.test_ages),
                 "strategy": strategy, "freeze": job.engine.freeze,
                 "train_images_per_s": round(size.max_iter * job.cfg.batch_size * size.trials
                                             / max(p.train_wall, 1e-9), 2),
                 "split_file": job.split_files[t]})
  return rows


def train_size(job: SizeJob, tb: StudyBoard) -> list[dict[str, Any]]:
  """Trains every trial of the size (resuming its latest checkpoint) and returns its result rows."""
  engine, size, orders = job.engine, job.size, stack_orders(job.records)
  keeper = make_keeper(job)
  ckpt = size_checkpoints(job.cfg, job.workdir, job.name, size, engine.chunk_steps, engine.freeze)
  resume = resume_point(job.cfg, ckpt, keeper, engine, size) if ckpt else None
  if resume:
    strategy = resume["strategy"]
  else:
    chosen = pick_strategy(job.cfg, engine, job.make_states, orders[:, :engine.chunk_steps], job.hyper(), job.dev)
    strategy = sharding_lib.same_choice(chosen, trials_lib.STRATEGIES)
  runner = engine.runner(strategy)
  layout = runner.layout(sharding_lib.MeshConfig.from_config(job.cfg), size.trials)
  progress = restore_progress(job, ckpt, resume, len(layout.slices))
  run = SizeRun(job, runner, layout, ckpt, keeper, progress_bar(job, strategy, layout.slices, resume), progress)
  t0 = time.perf_counter()
  for g in range(resume["group"] if resume else 0, len(layout.slices)):
    end_group(run, g, train_group(run, g, *start_group(run, g, resume), orders, tb))
  run.bar.close()
  if ckpt:
    ckpt.close()
  wall = time.perf_counter() - t0
  tb.residuals(job.name, size.n, progress.preds - job.data.test_ages)
  rows = result_rows(job, runner.strategy, progress, wall)
  if keeper:
    keeper.finish(size.n, rows, job.cfg.save_trials)
  return rows


def untouched_row(cfg: Any, trials: PriorTrials, data: StudyData, dev: dict[str, Any]) -> dict[str, Any]:
  """Size 0: the prior evaluated as it is (its new head, if any, drawn from the base seed)."""
  seed = trial_seed(cfg.seed, 0)
  runner = trials.engine.runner("loop")
  state = runner.group([trials.initial_state(seed)], runner.layout(None, 1))  # a group of one, unsharded
  t0 = time.perf_counter()
  preds = trials_lib.evaluate(runner, state, dev["test_images"], trials.engine.eval_crop, cfg.eval_batch_size)
  return {"prior": trials.prior.name, "n_train": 0, "trial": 0, "seed": seed, **_scores(preds[0], data), "steps": 0,
          "wall_s": round(time.perf_counter() - t0, 4), "baseline_mae": float("nan"), "freeze": trials.engine.freeze}
