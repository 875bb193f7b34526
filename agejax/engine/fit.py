"""Training ONE model (no trial axis): a jitted step, validation at a fixed interval, early stopping, best state.

Used by the transfer study (frozen vs full fine-tuning) and the pre-training stages. The order in which a run
visits its images is drawn on the host (`step.sample_order`). Each step crops and mirrors its uint8 batch on
the device (`step.augment`), preprocesses it for the prior and takes one optimiser step (`step.make_step`, the
trial engine's step). The batch comes from one of two places (`loader`):
  'device'  the images live on the device; the step gathers its batch there by index;
  'grain'   the images stay on the host (an array or the cache's memory map) and a Grain iterator
            (`agejax.data.pipeline.make_loader`) reads the same batches, in the same order, in background
            threads; the device then crops and mirrors them exactly as above (no host transforms), so both
            give the same numbers;
  'auto'    (default) 'device' for images already on the device, or when the set, the step and the
            validation images fit the device (`agejax.engine.memory`); 'grain' otherwise.
The step is a plain `jax.jit` (no `lax.scan`): one model needs no trial axis, and XLA:CPU runs convolutions
at the top level of a program much faster than inside a loop body (docs/benchmarks.md).

Checkpoints (`checkpoint=FitCheckpointing(...)`, agejax.engine.checkpoint): every `every_steps` steps, and
when SIGTERM asked to stop (`StopOnSignal`; checked every step, with several processes at checkpoint steps),
fit saves its state, the best state and validation history so far, the losses since the last validation and
the Grain iterator's position; a stop then raises `Preempted`. A later call with the same arguments resumes
from the latest checkpoint and ends with the same parameters as an uninterrupted run.

Modes: 'full' trains every parameter (BatchNorm statistics update unless the backbone has `bn_train=False`);
'frozen' trains the head only: the backbone runs in inference mode (BatchNorm running statistics, no
dropout), its features are a constant of the step, and the optimiser (`optimizer_for`) freezes every other
parameter (an lr multiplier 0: no update, optimiser state for the head alone).
"""

import dataclasses
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from agejax.data import pipeline
from agejax.engine import checkpoint as checkpoint_lib
from agejax.engine import memory as memory_lib
from agejax.engine import optim as optim_lib
from agejax.engine import step as step_lib
from agejax.engine.checkpoint import FitCheckpointing
from agejax.engine.metrics import mae
from agejax.engine.step import TrainState
from agejax.errors import TrainingError
from agejax.models.pretrained import Preprocess
from agejax.parallel import sharding as sharding_lib

log = logging.getLogger(__name__)
Mode = Literal["full", "frozen"]
Loader = Literal["auto", "device", "grain"]
LOADERS = ("auto", "device", "grain")
FROZEN_BACKBONE = r"^(?!head/)"  # every parameter path outside the head


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How long and how to train one model.

  steps:      total optimiser steps (0: `epochs` x steps per epoch); with early stopping, the cap.
  eval_every: steps between validations (0: one epoch); patience: validations without improvement before
              stopping (0: never stop early); min_delta: the improvement (years of MAE) that counts.
  stepsize:   steps per learning-rate decay (the optimiser's `gamma`; 0: no decay).
  """

  batch_size: int
  crop: int
  epochs: float = 1.0
  steps: int = 0
  mirror: bool = True
  random_crop: bool = False
  eval_every: int = 0
  patience: int = 0
  min_delta: float = 0.0
  stepsize: int = 0
  eval_batch_size: int = 64


@dataclasses.dataclass
class FitResult:
  """The best state (lowest validation MAE; the last one without validation) and the validation history."""

  params: Any
  batch_stats: Any
  history: list[dict[str, float]]
  best_step: int
  best_val_mae: float
  steps_run: int
  stopped_early: bool
  wall_s: float
  loader: str = "device"


def trainable(params: Any, mode: Mode) -> Any:
  """The part of `params` a mode trains: all of it, or the head alone."""
  if mode == "full":
    return params
  if mode == "frozen":
    return {"head": params["head"]}
  raise ValueError(f"mode must be 'full' or 'frozen', got {mode!r}")


def optimizer_for(optim_cfg: Any, params: Any, mode: Mode) -> optax.GradientTransformation:
  """The `optim` section's optimiser for a mode: 'frozen' holds everything but the head fixed (no update and
  no optimiser state outside the head)."""
  trainable(params, mode)  # checks the mode
  return optim_lib.make_optimizer(optim_cfg, params, freeze=FROZEN_BACKBONE if mode == "frozen" else "")


def plan_steps(cfg: FitConfig, num_items: int) -> tuple[int, int]:
  """(total steps, steps between validations) for a training set of `num_items`."""
  per_epoch = max(1, math.ceil(num_items / cfg.batch_size))
  total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
  return total, min(cfg.eval_every or per_epoch, total)


@dataclasses.dataclass
class _Best:
  """The best validation so far (a host copy of its state) and the validations since it improved."""

  min_delta: float
  val_mae: float = float("inf")
  step: int = -1
  variables: tuple[Any, Any] | None = None
  bad: int = 0

  def update(self, val_mae: float, step: int, state: TrainState) -> bool:
    if not val_mae < self.val_mae - self.min_delta:
      self.bad += 1
      return False
    self.val_mae, self.step, self.bad = val_mae, step, 0
    self.variables = jax.device_get((state.params, state.batch_stats))
    return True


@dataclasses.dataclass
class _Run:
  """Where a run stands: everything a checkpoint keeps (`wall_s`: the time of earlier, interrupted calls)."""

  state: TrainState
  best: _Best
  step: int = 0
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)
  losses: list[Any] = dataclasses.field(default_factory=list)  # per-step losses since the last validation
  stopped: bool = False
  wall_s: float = 0.0
  t0: float = dataclasses.field(default_factory=time.perf_counter)

  def elapsed(self) -> float:
    return self.wall_s + time.perf_counter() - self.t0


def choose_loader(loader: Loader, model: Any, state: TrainState, cfg: FitConfig, images: Any,
                  val_images: Any = None) -> str:
  """'device' or 'grain' (see the module docstring); every process takes process 0's choice."""
  if loader not in LOADERS:
    raise ValueError(f"fit: loader must be one of {LOADERS}, got {loader!r}")
  kind = loader
  if loader == "auto":
    budget = memory_lib.device_memory_bytes()
    kind = "device"
    if not isinstance(images, jax.Array) and budget is not None:
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      step = memory_lib.estimate_trial_memory(model, variables, state.opt_state, cfg.batch_size, cfg.crop)
      need = step.total + memory_lib.tree_bytes([images, val_images])
      kind = "device" if need <= budget * memory_lib.SAFETY else "grain"
  return sharding_lib.same_choice(kind, ("device", "grain"))


class _Feed:
  """Each step's (batch indices, pool images, pool ages): the device-resident pool gathered by index, or the
  batch a Grain iterator read on the host (then indices 0..B-1 of it)."""

  def __init__(self, kind: str, images: Any, ages: Any, order: np.ndarray, seed: int):
    self.order, self.loader = order, None
    if kind == "device":
      self.images, self.ages = jnp.asarray(images), jnp.asarray(ages)
    else:
      self.loader = pipeline.make_loader(np.asarray(images), np.asarray(ages), batch_size=order.shape[1], seed=seed,
                                         indices=order, shard_index=0, shard_count=1)
      self.idx = jnp.arange(order.shape[1], dtype=jnp.int32)

  def batch(self, step: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    if self.loader is None:
      return jnp.asarray(self.order[step]), self.images, self.ages
    b = next(self.loader)
    return self.idx, jnp.asarray(b["image"]), jnp.asarray(b["label"])


def _programs(model: Any, head: str, preprocess: Preprocess, tx: optax.GradientTransformation, cfg: FitConfig,
              mode: Mode) -> tuple[Callable[..., Any], Callable[..., jax.Array]]:
  """The jitted training step (donating its state) and prediction."""
  step_cfg = step_lib.StepConfig(cfg.batch_size, cfg.crop, cfg.mirror, cfg.random_crop, train_backbone=mode == "full")
  step_fn = jax.jit(step_lib.make_step(model, head, preprocess, tx, step_cfg), donate_argnums=0)
  return step_fn, jax.jit(step_lib.make_predict(model, head, preprocess))


def _evaluator(predict: Callable[..., jax.Array], val_images: Any, val_ages: np.ndarray | None,
               cfg: FitConfig) -> Callable[[TrainState], float] | None:
  """`evaluate(state) -> validation MAE`, or None without a validation set."""
  if val_images is None:
    return None
  val_images = jnp.asarray(val_images)

  def evaluate(state: TrainState) -> float:
    pred = step_lib.predict_padded(functools.partial(predict, state.params, state.batch_stats), val_images,
                                   cfg.eval_batch_size, cfg.crop)
    return mae(pred, val_ages)

  return evaluate


def _interval_loss(losses: list[Any], step: int, desc: str,
                   on_losses: Callable[[int, np.ndarray], None] | None) -> float:
  """The mean of an interval's per-step losses (fetched, handed to `on_losses`, checked finite)."""
  fetched = np.asarray(jax.device_get(losses), np.float32)
  if on_losses is not None:
    on_losses(step - len(fetched), fetched)
  train_loss = float(np.mean(fetched))
  if not math.isfinite(train_loss):
    raise TrainingError(f"{desc}: training loss is {train_loss} before step {step}; lower the learning rate")
  return train_loss


@dataclasses.dataclass(frozen=True)
class _Hooks:
  """What fit calls back, and what it reports to."""

  desc: str
  on_eval: Callable[[dict, bool, TrainState], None] | None
  on_losses: Callable[[int, np.ndarray], None] | None
  bar: Any


def _end_interval(run: _Run, cfg: FitConfig, per_epoch: int, evaluate: Callable[[TrainState], float] | None,
                  hooks: _Hooks) -> None:
  """A validation interval's end: its record (mean loss, validation MAE), the best state, early stopping."""
  record = {"step": run.step, "epoch": run.step / per_epoch,
            "train_loss": _interval_loss(run.losses, run.step, hooks.desc, hooks.on_losses)}
  run.losses, improved = [], False
  if evaluate is not None:
    record["val_mae"] = evaluate(run.state)
    improved = run.best.update(record["val_mae"], run.step, run.state)
    hooks.bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_mae=f"{record['val_mae']:.3f}")
  run.history.append(record)
  if hooks.on_eval is not None:
    hooks.on_eval(record, improved, run.state)
  run.stopped = bool(cfg.patience and run.best.bad >= cfg.patience)


def _open_checkpoints(checkpoint: FitCheckpointing | None, cfg: FitConfig, total: int, seed: int, kind: str,
                      items: np.ndarray) -> checkpoint_lib.FitCheckpoints | None:
  """The run's checkpoints; the fingerprint adds what fit knows defines the run (and the loader, whose
  iterator state only its own kind can restore)."""
  if checkpoint is None or not checkpoint.config.enabled:
    return None
  digest = hashlib.sha256(np.ascontiguousarray(items).tobytes()).hexdigest()[:16]
  fingerprint = {**checkpoint.fingerprint, "fit_steps": total, "fit_batch_size": cfg.batch_size, "fit_seed": seed,
                 "fit_loader": kind, "fit_items": digest}
  return checkpoint_lib.FitCheckpoints(checkpoint.directory, checkpoint.config, fingerprint)


def _resume(ckpts: checkpoint_lib.FitCheckpoints, run: _Run, feed: _Feed, desc: str) -> None:
  """Restores the latest checkpoint (if any) into `run` and `feed`."""
  meta = ckpts.latest()
  if meta is None:
    return
  s = meta["step"]
  run.state = ckpts.restore_state(s, run.state)
  if meta["has_best"]:
    run.best.variables = ckpts.restore_best(s, jax.device_get((run.state.params, run.state.batch_stats)))
  if meta["has_loader"]:
    feed.loader = ckpts.restore_loader(s, feed.loader)
  best_mae = meta["best_val_mae"]
  run.best.val_mae, run.best.step, run.best.bad = float("inf") if best_mae is None else best_mae, *meta["best"]
  run.step, run.history, run.wall_s = s, meta["history"], meta["wall_s"]
  run.losses = list(np.asarray(meta["losses"], np.float32))
  log.info("%s: resuming from checkpoint at step %d (%s)", desc, s, ckpts.directory)


def _maybe_save(ckpts: checkpoint_lib.FitCheckpoints, run: _Run, feed: _Feed, total: int, desc: str) -> None:
  """Saves every `every_steps` steps, or when a stop was requested (then raises `Preempted`)."""
  due = run.step % ckpts.config.every_steps == 0
  stop = (due or jax.process_count() == 1) and checkpoint_lib.stop_requested()
  if not (due or stop) or run.step >= total:
    return
  best_mae = run.best.val_mae if math.isfinite(run.best.val_mae) else None
  meta = {"best_val_mae": best_mae, "best": [run.best.step, run.best.bad], "history": run.history,
          "wall_s": run.elapsed(), "losses": [float(x) for x in np.asarray(jax.device_get(run.losses), np.float32)]}
  ckpts.save_fit(run.step, meta, run.best.variables, run.state, feed.loader)
  if stop:
    raise checkpoint_lib.Preempted(f"{desc}: stopped on request at step {run.step} of {total} after a checkpoint "
                                   f"in {ckpts.directory}; rerun the same command to continue")


def _result(run: _Run, kind: str) -> FitResult:
  jax.block_until_ready(run.state.params)
  if run.best.variables is None:
    params, batch_stats = jax.device_get((run.state.params, run.state.batch_stats))
    return FitResult(params, batch_stats, run.history, run.step, float("nan"), run.step, run.stopped, run.elapsed(),
                     kind)
  return FitResult(*run.best.variables, run.history, run.best.step, run.best.val_mae, run.step, run.stopped,
                   run.elapsed(), kind)


def fit(model: Any, head: str, preprocess: Preprocess, tx: optax.GradientTransformation, state: TrainState,
        cfg: FitConfig, mode: Mode, images: Any, ages: Any, items: np.ndarray, val_images: Any = None,
        val_ages: np.ndarray | None = None, seed: int = 0,
        on_eval: Callable[[dict, bool, TrainState], None] | None = None, progress: bool = True, desc: str = "fit",
        on_losses: Callable[[int, np.ndarray], None] | None = None, loader: Loader = "auto",
        checkpoint: FitCheckpointing | None = None) -> FitResult:
  """Trains `state` (optimiser `tx`, e.g. `optimizer_for`) on `images[items]` and returns the best state by
  validation MAE.

  `images` (uint8, N x S x S x 3) and `ages`: device arrays, or host arrays (a memory map) that `loader`
  reads through Grain when they do not fit the device (module docstring). Without a validation set, the last
  state is returned. `on_eval(record, improved, state)` is called after every validation (e.g. to save the
  best checkpoint and log scalars); `record` holds step, epoch, train_loss (mean since the last validation)
  and val_mae. `on_losses(first_step, losses)` gets the per-step losses (steps first_step + 1 ..) fetched at
  each validation interval, before they are checked. `checkpoint`: resume from / save to (module docstring).
  """
  items = np.asarray(items)
  trainable(state.params, mode)  # checks the mode
  total, every = plan_steps(cfg, len(items))
  order = step_lib.sample_order(items, total, cfg.batch_size, seed)
  kind = choose_loader(loader, model, state, cfg, images, val_images)
  if kind == "grain":
    log.info("%s: reading the %d training images through Grain (they do not stay on the device)", desc, len(images))
  feed = _Feed(kind, images, ages, order, seed)
  step_fn, predict = _programs(model, head, preprocess, tx, cfg, mode)
  evaluate = _evaluator(predict, val_images, val_ages, cfg)
  hyper = step_lib.Hyper(jnp.asarray(cfg.stepsize or 2**30, jnp.int32), jnp.asarray(total, jnp.int32))
  per_epoch = max(1, math.ceil(len(items) / cfg.batch_size))
  run = _Run(TrainState(*jax.tree.map(jnp.copy, tuple(state))), _Best(cfg.min_delta))  # the step donates its input
  ckpts = _open_checkpoints(checkpoint, cfg, total, seed, kind, items)
  try:
    if ckpts is not None:
      _resume(ckpts, run, feed, desc)
    hooks = _Hooks(desc, on_eval, on_losses, tqdm(total=total, initial=run.step, desc=desc, unit="step",
                                                  disable=not progress, leave=False))
    while run.step < total and not run.stopped:
      idx, pool, pool_ages = feed.batch(run.step)
      run.state, loss = step_fn(run.state, jnp.asarray(run.step, jnp.int32), hyper, idx, pool, pool_ages)
      run.losses.append(loss)
      run.step += 1
      hooks.bar.update()
      if run.step % every == 0 or run.step == total:
        _end_interval(run, cfg, per_epoch, evaluate, hooks)
      if ckpts is not None and not run.stopped:
        _maybe_save(ckpts, run, feed, total, desc)
    hooks.bar.close()
  finally:
    if ckpts is not None:
      ckpts.close()  # waits for a save in the background
  return _result(run, kind)
