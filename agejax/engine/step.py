"""One optimiser step of one model, and what it needs: the state pytree, the augmentation, the sample order.

Everything a trial (or a single trained model) owns lives in an explicit pytree (`TrainState`): parameters,
BatchNorm statistics, optimiser state and its PRNG key. The order in which a run visits its images is drawn on
the host (`sample_order`, Caffe-style per-epoch shuffles); images stay on the device as uint8, and each step
gathers its batch from the pool, crops and mirrors it on the device, preprocesses it and takes one step with an
optax optimiser (`agejax.engine.optim`). The trial engine scans this step per trial (`trials.make_train_chunk`);
the single-model trainer (`fit.fit`) jits it.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from agejax.engine.optim import with_step
from agejax.engine.orders import sample_order  # noqa: F401 (re-exported for the engine's callers)
from agejax.models.heads import age_loss, predict_age
from agejax.models.pretrained import Preprocess


class TrainState(NamedTuple):
  """Everything one trial (or one trained model) carries from step to step."""

  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array


TrialState = TrainState  # the trial engine's name for it


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static description of a training step (hashable pieces only; the optimiser is closed over).

  train_backbone False: the backbone runs in inference mode (running BatchNorm statistics, no dropout) and its
  features are a constant of the step, so only the head learns (pair it with an optimiser that freezes the
  backbone, `make_optimizer(..., freeze=...)`).
  """

  batch_size: int
  crop: int
  mirror: bool = True
  random_crop: bool = True
  train_backbone: bool = True


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def init_state(variables: Any, tx: optax.GradientTransformation, seed: int | jax.Array) -> TrainState:
  """The starting state of a run: `variables`' parameters and statistics, fresh `tx` state, the seed's key."""
  params = variables["params"]
  return TrainState(params, variables.get("batch_stats", {}), tx.init(params), jax.random.key(seed))


def make_initial_state(tx: optax.GradientTransformation, new_head: Callable[[Any, jax.Array], Any] | None = None
                       ) -> Callable[[Any, int], TrainState]:
  """`start(variables, seed)` -> `init_state` as one compiled program; with `new_head(variables, key)`, the head's
  parameters are drawn from `fold_in(key(seed), 3)` first. The variables are an argument, not constants baked
  into the program (priors of one architecture share it); built op by op, a start costs ~0.2 s of dispatches."""

  def start(variables: Any, seed: jax.Array) -> TrainState:
    params = dict(variables["params"])
    if new_head is not None:
      params["head"] = new_head(variables, jax.random.fold_in(jax.random.key(seed), 3))
    return init_state({**variables, "params": params}, tx, seed)

  start = jax.jit(start)
  return lambda variables, seed: start(variables, jnp.asarray(seed, jnp.uint32))


def augment(key: jax.Array, images: jax.Array, crop: int, random_crop: bool, mirror: bool) -> jax.Array:
  """Random (or centre) crop and random mirror of a uint8 batch (B, S, S, 3), on the device."""
  b, s = images.shape[0], images.shape[1]
  k_y, k_x, k_f = jax.random.split(key, 3)
  if random_crop:
    oy = jax.random.randint(k_y, (b,), 0, s - crop + 1)
    ox = jax.random.randint(k_x, (b,), 0, s - crop + 1)
  else:
    oy = ox = jnp.full((b,), (s - crop) // 2)
  crops = jax.vmap(lambda im, y, x: lax.dynamic_slice(im, (y, x, 0), (crop, crop, im.shape[-1])))(images, oy, ox)
  if mirror:
    flip = jax.random.bernoulli(k_f, 0.5, (b,))
    crops = jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)
  return crops


def center_crop(images: jax.Array, crop: int) -> jax.Array:
  s = images.shape[1]
  o = (s - crop) // 2
  return images[:, o:o + crop, o:o + crop]


class Hyper(NamedTuple):
  """Traced per-size values: the solver's step size and the number of steps to take."""

  stepsize: jax.Array
  max_iter: jax.Array


Inputs = Callable[[jax.Array, Any, jax.Array], jax.Array]


def _forward(model: Any, train_backbone: bool, params: Any, batch_stats: Any, x: jax.Array,
             dropout_key: jax.Array) -> tuple[jax.Array, Any]:
  """Training-mode outputs and the updated BatchNorm statistics (unchanged with an inference-mode backbone)."""
  rngs = {"dropout": dropout_key}
  if not train_backbone:
    feats = model.apply(_variables(params, batch_stats), x, method=lambda m, x: m.backbone(x, train=False))
    out = model.apply({"params": {"head": params["head"]}}, lax.stop_gradient(feats),
                      method=lambda m, f: m.head(f, train=True), rngs=rngs)
    return out, batch_stats
  if batch_stats:
    out, updated = model.apply(_variables(params, batch_stats), x, train=True, rngs=rngs, mutable=["batch_stats"])
    return out, updated["batch_stats"]
  return model.apply({"params": params}, x, train=True, rngs=rngs), batch_stats


def make_step(model: Any, head: str, preprocess: Preprocess, tx: optax.GradientTransformation, cfg: StepConfig,
              inputs: Inputs | None = None) -> Callable[..., tuple[TrainState, jax.Array]]:
  """`step(state, step, hyper, batch_idx[B], pool_images, pool_ages) -> (state, loss)`: one optimiser step
  of ONE model: gather its batch from the uint8 pool, crop/mirror, preprocess, forward, backward, update.

  `inputs(key, pool_images, batch_idx) -> model input` replaces the gather/crop/mirror/preprocess (e.g. a
  frozen prefix's cached features, agejax.engine.features); it gets the key the augmentation would get.
  `hyper.stepsize` decays the learning rate (`optim.with_step`); `hyper.max_iter` is the caller's."""

  def loss_fn(params, batch_stats, x, ages, dropout_key):
    out, batch_stats = _forward(model, cfg.train_backbone, params, batch_stats, x, dropout_key)
    return age_loss(out.astype(jnp.float32), ages, head).mean(), batch_stats

  def step_fn(state: TrainState, step, hyper, idx, pool_images, pool_ages):
    k_aug, k_drop = jax.random.split(jax.random.fold_in(state.key, step))
    if inputs is None:
      x = preprocess(augment(k_aug, pool_images[idx], cfg.crop, cfg.random_crop, cfg.mirror))
    else:
      x = inputs(k_aug, pool_images, idx)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, x, pool_ages[idx], k_drop)
    updates, opt_state = tx.update(grads, with_step(state.opt_state, step, hyper.stepsize), state.params)
    return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state, state.key), loss

  return step_fn


def make_predict(model: Any, head: str, preprocess: Preprocess) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """`predict(params, batch_stats, uint8 crops) -> ages` for one model."""

  def predict(params, batch_stats, images):
    out = model.apply(_variables(params, batch_stats), preprocess(images), train=False)
    return predict_age(out.astype(jnp.float32), head)

  return predict


def predict_padded(predict: Callable[[jax.Array], jax.Array], images: jax.Array, batch_size: int,
                   crop: int | None) -> np.ndarray:
  """`predict(batch) -> ages[..., batch_size]` over every image, in fixed-size batches (the last one padded with
  copies of the last image) so one program serves all; `crop` None takes the inputs as they are (cached
  features), else centre-crops them. Returns ages[..., N] (the batch on the last axis)."""
  out = []
  for start in range(0, images.shape[0], batch_size):
    batch = images[start:start + batch_size]
    n = batch.shape[0]
    if n < batch_size:
      batch = jnp.concatenate([batch, jnp.repeat(batch[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(predict(batch if crop is None else center_crop(batch, crop)))[..., :n])
  return np.concatenate(out, axis=-1) if out else np.zeros((0,), np.float32)
