"""Few-shot trials: T independent fine-tuning runs of one prior, trained by one jitted step.

Everything a trial owns lives in an explicit pytree (`TrialState`): parameters, BatchNorm statistics,
optimiser state and its PRNG key. A trial's randomness depends only on its seed, so trial i of a
vmapped run equals a lone run of seed i. The order in which a trial visits its images is drawn on the
host (`sample_order`, Caffe-style per-epoch shuffles) and fed chunk by chunk as a (steps, batch) index
array; images stay on the device as uint8, and each step gathers its batch from the pool, crops and
mirrors it on the device, preprocesses it for the prior and takes one optimiser step. Steps are
`lax.scan`ned in fixed-length chunks, and the step size and step count are traced values, so one
compiled program serves every training-set size of a study.

Strategies for the trial axis (`parallel`):
  'vmap'  one program, trials vectorised (in groups of `trial_chunk`);
  'map'   one program, `lax.map` over trials (vectorised `trial_chunk` at a time);
  'loop'  one program per trial, called in a Python loop (often fastest on CPU: vmapped convolutions
          with per-trial weights become grouped convolutions);
  'auto'  measures the three on the real shapes, caches and logs the fastest.
"""

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agejax.models.heads import age_loss, predict_age
from agejax.models.pretrained import Preprocess

STRATEGIES = ("vmap", "map", "loop")


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


def make_train_chunk(model: Any, head: str, preprocess: Preprocess, optimizer: Any,
                     cfg: StepConfig) -> Callable[..., tuple[TrialState, jax.Array]]:
  """`chunk(state, step0, hyper, batch_idx[K, B], pool_images, pool_ages) -> (state, losses[K])` for ONE trial.

  Steps at or past `hyper.max_iter` leave the state unchanged (loss reported as 0), so the last chunk of
  a size may be partial without another compilation.
  """

  def loss_fn(params, batch_stats, x, ages, dropout_key):
    variables = _variables(params, batch_stats)
    if batch_stats:
      out, updated = model.apply(variables, x, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])
      batch_stats = updated["batch_stats"]
    else:
      out = model.apply(variables, x, train=True, rngs={"dropout": dropout_key})
    return age_loss(out, ages, head).mean(), batch_stats

  def step_fn(state: TrialState, step, hyper, idx, pool_images, pool_ages):
    k_aug, k_drop = jax.random.split(jax.random.fold_in(state.key, step))
    images = augment(k_aug, pool_images[idx], cfg.crop, cfg.random_crop, cfg.mirror)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, preprocess(images), pool_ages[idx], k_drop)
    params, opt_state = optimizer.update(grads, state.opt_state, state.params, step, hyper.stepsize)
    return TrialState(params, batch_stats, opt_state, state.key), loss

  def chunk(state, step0, hyper, batch_idx, pool_images, pool_ages):
    def body(st, xs):
      step, idx = xs
      return lax.cond(step < hyper.max_iter,
                      lambda s: step_fn(s, step, hyper, idx, pool_images, pool_ages),
                      lambda s: (s, jnp.zeros((), jnp.float32)), st)
    steps = step0 + jnp.arange(batch_idx.shape[0])
    return lax.scan(body, state, (steps, batch_idx))

  return chunk


def make_predict(model: Any, head: str, preprocess: Preprocess) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """`predict(params, batch_stats, uint8 crops) -> ages` for one trial."""

  def predict(params, batch_stats, images):
    out = model.apply(_variables(params, batch_stats), preprocess(images), train=False)
    return predict_age(out, head)

  return predict


def stack_trees(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any, n: int) -> list[Any]:
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def _groups(n: int, size: int) -> list[slice]:
  size = max(1, min(size or n, n))
  return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class TrialRunner:
  """Trains the T trials of one size in groups, one group after another, with a chosen strategy.

  'loop' groups hold one unstacked trial; 'vmap' groups stack `trial_chunk` trials (all by default);
  'map' puts all trials through one `lax.map` program (`trial_chunk` vectorised at a time). Only one
  group's state is alive at a time, which bounds memory for large models.
  """

  def __init__(self, chunk_fn: Callable, predict_fn: Callable, strategy: str, trial_chunk: int = 0):
    if strategy not in STRATEGIES:
      raise ValueError(f"unknown trials.parallel {strategy!r}; expected one of {STRATEGIES} or 'auto'")
    self.strategy = strategy
    self.trial_chunk = trial_chunk
    in_axes = (0, None, None, 0, None, None)
    if strategy == "loop":
      self._train = jax.jit(chunk_fn, donate_argnums=0)
      self._predict = jax.jit(predict_fn)
    elif strategy == "vmap":
      self._train = jax.jit(jax.vmap(chunk_fn, in_axes=in_axes), donate_argnums=0)
      self._predict = jax.jit(jax.vmap(predict_fn, in_axes=(0, 0, None)))
    else:
      batch = trial_chunk or None

      def mapped(states, step0, hyper, batch_idx, pool_images, pool_ages):
        return lax.map(lambda a: chunk_fn(a[0], step0, hyper, a[1], pool_images, pool_ages), (states, batch_idx),
                       batch_size=batch)

      self._train = jax.jit(mapped, donate_argnums=0)
      self._predict = jax.jit(
          lambda p, b, x: lax.map(lambda a: predict_fn(a[0], a[1], x), (p, b), batch_size=batch))

  def slices(self, num_trials: int) -> list[slice]:
    """The groups of trials run together (one compiled program serves groups of one size)."""
    if self.strategy == "loop":
      return _groups(num_trials, 1)
    if self.strategy == "vmap":
      return _groups(num_trials, self.trial_chunk or num_trials)
    return [slice(0, num_trials)]

  def group(self, states: Sequence[TrialState]) -> TrialState:
    """One group's state from its trials' states (stacked unless 'loop')."""
    if self.strategy == "loop":  # own copy: the step donates its state, and trials share the prior's buffers
      return jax.tree.map(jnp.copy, states[0])
    return stack_trees(states)

  def ungroup(self, state: TrialState, size: int) -> list[TrialState]:
    return [state] if self.strategy == "loop" else unstack_tree(state, size)

  def train(self, state: TrialState, batch_idx: np.ndarray, step0: int, hyper: Hyper, pool_images: jax.Array,
            pool_ages: jax.Array) -> tuple[TrialState, np.ndarray]:
    """Advances one group by one chunk of steps; `batch_idx` is (group, K, B) (or (K, B) for 'loop').

    Returns the new state and the losses (group size, K)."""
    state, loss = self._train(state, jnp.asarray(step0, jnp.int32), hyper, jnp.asarray(batch_idx), pool_images,
                              pool_ages)
    loss = np.asarray(loss)
    return state, (loss[None] if self.strategy == "loop" else loss)

  def group_rows(self, array: np.ndarray, sl: slice) -> np.ndarray:
    """A group's slice of a per-trial array (the lone trial's row for 'loop')."""
    return array[sl.start] if self.strategy == "loop" else array[sl]

  def predict(self, state: TrialState, images: jax.Array) -> np.ndarray:
    """Predicted ages (group size, N) on one batch of uint8 crops."""
    out = np.asarray(self._predict(state.params, state.batch_stats, images))
    return out[None] if self.strategy == "loop" else out


def evaluate(runner: TrialRunner, state: TrialState, test_images: jax.Array, crop: int,
             batch_size: int) -> np.ndarray:
  """Predicted ages (group size, Q) of one group on the whole test set, in fixed-size padded batches."""
  q = test_images.shape[0]
  preds = []
  for start in range(0, q, batch_size):
    batch = test_images[start:start + batch_size]
    n = batch.shape[0]
    if n < batch_size:  # pad so every batch has one shape and compiles once
      batch = jnp.concatenate([batch, jnp.repeat(batch[-1:], batch_size - n, axis=0)])
    preds.append(runner.predict(state, center_crop(batch, crop))[:, :n])
  return np.concatenate(preds, axis=1)


# ---------------------------------------------------------------------------------------------------
# 'auto': measure the strategies on the real shapes, cache the winner.


def _cache_path() -> str:
  root = os.environ.get("AGEJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "agejax"))
  return os.path.join(root, "auto_strategy.json")


def auto_key(spec: Any, num_trials: int, chunk_steps: int, pool_shape: tuple[int, ...], step_cfg: StepConfig,
             trial_chunk: int) -> str:
  """Cache key of an 'auto' choice: backend, device, model, trial count and shapes."""
  dev = jax.devices()[0]
  blob = json.dumps([jax.default_backend(), dev.device_kind, len(jax.devices()), spec, num_trials, chunk_steps,
                     list(pool_shape), dataclasses.asdict(step_cfg), trial_chunk],
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def choose_strategy(key: str, measure: Callable[[str], float], candidates: Sequence[str] = STRATEGIES,
                    log: logging.Logger | None = None) -> tuple[str, dict[str, float]]:
  """The fastest strategy for `key` (seconds per chunk from `measure`), cached on disk."""
  path = _cache_path()
  cache = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        cache = json.load(f)
    except (OSError, json.JSONDecodeError):
      cache = {}
  if key in cache:
    entry = cache[key]
    if log:
      log.info("trials.parallel=auto: cached choice %r (%s)", entry["choice"], entry["seconds"])
    return entry["choice"], entry["seconds"]
  seconds = {name: measure(name) for name in candidates}
  choice = min(seconds, key=seconds.get)
  cache[key] = {"choice": choice, "seconds": seconds}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(cache, f, indent=1)
  os.replace(tmp, path)
  if log:
    log.info("trials.parallel=auto: measured %s -> %r", {k: round(v, 4) for k, v in seconds.items()}, choice)
  return choice, seconds


def time_chunk(runner: TrialRunner, make_states: Callable[[slice], list[TrialState]], orders: np.ndarray,
               hyper: Hyper, pool_images: jax.Array, pool_ages: jax.Array, steps: int = 2) -> float:
  """Estimated seconds per chunk for all trials, measured on the first group after compilation.

  `orders` is (T, K, B). Only `steps` steps of the chunk execute (the rest are skipped through
  `max_iter`, a real branch since the predicate is not batched), so measuring a slow strategy is cheap.
  """
  num_trials, k = orders.shape[:2]
  sl = runner.slices(num_trials)[0]
  state = runner.group(make_states(sl))
  idx = runner.group_rows(orders, sl)
  one = Hyper(hyper.stepsize, jnp.asarray(1, jnp.int32))
  state, _ = runner.train(state, idx, 0, one, pool_images, pool_ages)  # compile (and one step)
  jax.block_until_ready(state)
  skip = Hyper(hyper.stepsize, jnp.asarray(0, jnp.int32))
  t0 = time.perf_counter()
  state, _ = runner.train(state, idx, 1, skip, pool_images, pool_ages)  # the fixed cost of a chunk
  jax.block_until_ready(state)
  overhead = time.perf_counter() - t0
  run = Hyper(hyper.stepsize, jnp.asarray(1 + steps, jnp.int32))
  t0 = time.perf_counter()
  state, _ = runner.train(state, idx, 1, run, pool_images, pool_ages)
  jax.block_until_ready(state)
  per_step = max(time.perf_counter() - t0 - overhead, 1e-9) / steps
  return (overhead + per_step * k) * num_trials / (sl.stop - sl.start)
