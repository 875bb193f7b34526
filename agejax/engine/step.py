"""One optimiser step of one model, and what it needs: the state pytree, the augmentation, the sample order.

Everything a trial (or a single trained model) owns lives in an explicit pytree (`TrialState`): parameters,
BatchNorm statistics, optimiser state and its PRNG key. The order in which a run visits its images is drawn on
the host (`sample_order`, Caffe-style per-epoch shuffles); images stay on the device as uint8, and each step
gathers its batch from the pool, crops and mirrors it on the device, preprocesses it and takes one step.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agejax.models.heads import age_loss, predict_age
from agejax.models.pretrained import Preprocess


class TrialState(NamedTuple):
  """Everything one trial carries from step to step."""

  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static description of a training step (hashable pieces only; the optimiser is closed over)."""

  batch_size: int
  crop: int
  mirror: bool = True
  random_crop: bool = True


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def sample_order(items: np.ndarray, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """(steps, batch) pool indices: consecutive batches of per-epoch shuffles of a trial's items.

  Like Caffe's shuffling data layer, a batch that crosses an epoch boundary continues into the next
  epoch's shuffle; with fewer items than the batch size, one batch spans several epochs.
  """
  items = np.asarray(items)
  need = steps * batch_size
  rng = np.random.default_rng([seed, len(items), 0x5EED])
  epochs = -(-need // len(items))
  order = np.concatenate([items[rng.permutation(len(items))] for _ in range(epochs)])
  return order[:need].reshape(steps, batch_size).astype(np.int32)


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


def make_train_step(model: Any, head: str, preprocess: Preprocess, optimizer: Any, cfg: StepConfig,
                    inputs: Inputs | None = None) -> Callable[..., tuple[TrialState, jax.Array]]:
  """`step(state, step, hyper, batch_idx[B], pool_images, pool_ages) -> (state, loss)`: one optimiser step
  of ONE trial: gather its batch from the uint8 pool, crop/mirror, preprocess, forward, backward, update.

  `inputs(key, pool_images, batch_idx) -> model input` replaces the gather/crop/mirror/preprocess (e.g. a
  frozen prefix's cached features, agejax.engine.features); it gets the key the augmentation would get."""

  def loss_fn(params, batch_stats, x, ages, dropout_key):
    variables = _variables(params, batch_stats)
    if batch_stats:
      out, updated = model.apply(variables, x, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])
      batch_stats = updated["batch_stats"]
    else:
      out = model.apply(variables, x, train=True, rngs={"dropout": dropout_key})
    return age_loss(out.astype(jnp.float32), ages, head).mean(), batch_stats

  def step_fn(state: TrialState, step, hyper, idx, pool_images, pool_ages):
    k_aug, k_drop = jax.random.split(jax.random.fold_in(state.key, step))
    if inputs is None:
      x = preprocess(augment(k_aug, pool_images[idx], cfg.crop, cfg.random_crop, cfg.mirror))
    else:
      x = inputs(k_aug, pool_images, idx)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, x, pool_ages[idx], k_drop)
    params, opt_state = optimizer.update(grads, state.opt_state, state.params, step, hyper.stepsize)
    return TrialState(params, batch_stats, opt_state, state.key), loss

  return step_fn



def make_predict(model: Any, head: str, preprocess: Preprocess) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """`predict(params, batch_stats, uint8 crops) -> ages` for one trial."""

  def predict(params, batch_stats, images):
    out = model.apply(_variables(params, batch_stats), preprocess(images), train=False)
    return predict_age(out.astype(jnp.float32), head)

  return predict

