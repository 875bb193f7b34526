"""Training ONE model (no trial axis): a jitted step, validation at a fixed interval, early stopping, best state.

Used by the transfer study (frozen vs full fine-tuning) and the pre-training stages. Images stay on the device
as uint8; each step gathers its batch by index, crops and mirrors it on the device (`trials.augment`),
preprocesses it for the prior and takes one optimiser step. The step is a plain `jax.jit` (no `lax.scan`):
one model needs no trial axis, and XLA:CPU runs convolutions at the top level of a program much faster than
inside a loop body (docs/benchmarks.md).

Modes: 'full' trains every parameter (BatchNorm statistics update unless the backbone has `bn_train=False`);
'frozen' trains the head only: the backbone runs in inference mode (BatchNorm running statistics, no
dropout), its features are a constant of the step, and the optimiser holds state for the head alone.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from agejax.engine import trials as trials_lib
from agejax.engine.metrics import mae
from agejax.errors import TrainingError
from agejax.models.heads import age_loss
from agejax.models.pretrained import Preprocess

log = logging.getLogger(__name__)
Mode = Literal["full", "frozen"]


class FitState(NamedTuple):
  """Parameters (all of them), BatchNorm statistics, optimiser state (of the trained part) and PRNG key."""

  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array


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


def trainable(params: Any, mode: Mode) -> Any:
  """The part of `params` a mode trains: all of it, or the head alone."""
  if mode == "full":
    return params
  if mode == "frozen":
    return {"head": params["head"]}
  raise ValueError(f"mode must be 'full' or 'frozen', got {mode!r}")


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_step(model: Any, head: str, preprocess: Preprocess, optimizer: Any, cfg: FitConfig,
              mode: Mode) -> Callable[..., tuple[FitState, jax.Array]]:
  """Jitted `step(state, step, stepsize, idx[B], images, ages) -> (state, loss)`; the state is donated."""

  def loss_fn(train_params, state, x, ages, key):
    params = {**state.params, **train_params}
    if mode == "frozen":
      feats = model.apply(_variables(params, state.batch_stats), x,
                          method=lambda m, x: m.backbone(x, train=False))
      out = model.apply({"params": {"head": params["head"]}}, jax.lax.stop_gradient(feats),
                        method=lambda m, f: m.head(f, train=True), rngs={"dropout": key})
      return age_loss(out, ages, head).mean(), state.batch_stats
    if state.batch_stats:
      out, updated = model.apply(_variables(params, state.batch_stats), x, train=True, rngs={"dropout": key},
                                 mutable=["batch_stats"])
      return age_loss(out, ages, head).mean(), updated["batch_stats"]
    out = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
    return age_loss(out, ages, head).mean(), state.batch_stats

  def step(state: FitState, step: jax.Array, stepsize: jax.Array, idx: jax.Array, images: jax.Array,
           ages: jax.Array) -> tuple[FitState, jax.Array]:
    k_aug, k_drop = jax.random.split(jax.random.fold_in(state.key, step))
    x = preprocess(trials_lib.augment(k_aug, images[idx], cfg.crop, cfg.random_crop, cfg.mirror))
    train_params = trainable(state.params, mode)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params, state, x, ages[idx],
                                                                             k_drop)
    new, opt_state = optimizer.update(grads, state.opt_state, train_params, step, stepsize)
    return FitState({**state.params, **new}, batch_stats, opt_state, state.key), loss

  return jax.jit(step, donate_argnums=0)


def make_predictor(model: Any, head: str, preprocess: Preprocess) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """Jitted `predict(params, batch_stats, uint8 crops) -> ages`."""
  return jax.jit(trials_lib.make_predict(model, head, preprocess))


def predict_images(predict: Callable, params: Any, batch_stats: Any, images: jax.Array, crop: int,
                   batch_size: int) -> np.ndarray:
  """Ages for every image (centre crop), in fixed-size padded batches so one program serves all."""
  out = []
  for start in range(0, images.shape[0], batch_size):
    batch = images[start:start + batch_size]
    n = batch.shape[0]
    if n < batch_size:
      batch = jnp.concatenate([batch, jnp.repeat(batch[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(predict(params, batch_stats, trials_lib.center_crop(batch, crop)))[:n])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def plan_steps(cfg: FitConfig, num_items: int) -> tuple[int, int]:
  """(total steps, steps between validations) for a training set of `num_items`."""
  per_epoch = max(1, math.ceil(num_items / cfg.batch_size))
  total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
  return total, min(cfg.eval_every or per_epoch, total)


def fit(model: Any, head: str, preprocess: Preprocess, optimizer: Any, state: FitState, cfg: FitConfig,
        mode: Mode, images: jax.Array, ages: jax.Array, items: np.ndarray, val_images: jax.Array | None = None,
        val_ages: np.ndarray | None = None, seed: int = 0, on_eval: Callable[[dict, bool, FitState], None] | None
        = None, progress: bool = True, desc: str = "fit",
        on_losses: Callable[[int, np.ndarray], None] | None = None) -> FitResult:
  """Trains `state` on `images[items]` and returns the best state by validation MAE.

  Without a validation set, the last state is returned. `on_eval(record, improved, state)` is called after
  every validation (e.g. to save the best checkpoint and log scalars); `record` holds step, epoch,
  train_loss (mean since the last validation), val_mae and lr_step. `on_losses(first_step, losses)` gets the
  per-step losses (steps first_step + 1 ..) fetched at each validation interval, before they are checked.
  """
  items = np.asarray(items)
  total, every = plan_steps(cfg, len(items))
  order = trials_lib.sample_order(items, total, cfg.batch_size, seed)
  step_fn = make_step(model, head, preprocess, optimizer, cfg, mode)
  predict = make_predictor(model, head, preprocess) if val_images is not None else None
  stepsize = jnp.asarray(cfg.stepsize or 2**30, jnp.int32)
  per_epoch = max(1, math.ceil(len(items) / cfg.batch_size))
  state = FitState(*jax.tree.map(jnp.copy, tuple(state)))  # own buffers: the step donates its input
  best = (float("inf"), -1, None)
  history, losses, bad, stopped = [], [], 0, False
  bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
  t0 = time.perf_counter()
  step = 0
  for step in range(total):
    state, loss = step_fn(state, jnp.asarray(step, jnp.int32), stepsize, jnp.asarray(order[step]), images, ages)
    losses.append(loss)
    bar.update()
    if (step + 1) % every and step + 1 < total:
      continue
    fetched = np.asarray(jax.device_get(losses), np.float32)
    train_loss = float(np.mean(fetched))
    losses = []
    if on_losses is not None:
      on_losses(step + 1 - len(fetched), fetched)
    if not math.isfinite(train_loss):
      raise TrainingError(f"{desc}: training loss is {train_loss} before step {step + 1}; lower the learning rate")
    record = {"step": step + 1, "epoch": (step + 1) / per_epoch, "train_loss": train_loss}
    improved = False
    if predict is not None:
      pred = predict_images(predict, state.params, state.batch_stats, val_images, cfg.crop, cfg.eval_batch_size)
      record["val_mae"] = mae(pred, val_ages)
      improved = record["val_mae"] < best[0] - cfg.min_delta
      if improved:
        best = (record["val_mae"], step + 1, jax.device_get((state.params, state.batch_stats)))
        bad = 0
      else:
        bad += 1
      bar.set_postfix(loss=f"{train_loss:.3f}", val_mae=f"{record['val_mae']:.3f}")
    history.append(record)
    if on_eval is not None:
      on_eval(record, improved, state)
    if cfg.patience and bad >= cfg.patience:
      stopped = True
      break
  bar.close()
  jax.block_until_ready(state.params)
  wall = time.perf_counter() - t0
  if best[2] is None:
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    return FitResult(params, batch_stats, history, step + 1, float("nan"), step + 1, stopped, wall)
  params, batch_stats = best[2]
  return FitResult(params, batch_stats, history, best[1], best[0], step + 1, stopped, wall)
