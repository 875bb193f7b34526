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
  'loop'  one program per trial (per device), called in a Python loop (fastest on CPU: vmapped
          convolutions with per-trial weights become grouped convolutions);
  'auto'  measures the candidates on the real shapes, caches and logs the fastest.

With several devices (e.g. one CPU device per core), groups spread their trials over the devices, each
device running its own block (`_per_device`); a 'loop' group then holds one trial per device.
"""

import collections
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from agejax.engine.autotune import STRATEGIES, auto_key, choose_strategy, default_candidates  # noqa: F401
from agejax.engine.step import (  # noqa: F401
  Hyper,
  Inputs,
  StepConfig,
  TrialState,
  augment,
  center_crop,
  make_predict,
  make_step,
  predict_padded,
  sample_order,
)
from agejax.models.pretrained import Preprocess
from agejax.parallel import sharding as sharding_lib


def make_train_chunk(model: Any, head: str, preprocess: Preprocess, tx: optax.GradientTransformation, cfg: StepConfig,
                     inputs: Inputs | None = None) -> Callable[..., tuple[TrialState, jax.Array]]:
  """`chunk(state, step0, hyper, batch_idx[K, B], pool_images, pool_ages) -> (state, losses[K])` for ONE trial.

  Steps at or past `hyper.max_iter` leave the state unchanged (loss reported as 0), so the last chunk of
  a size may be partial without another compilation.
  """
  step_fn = make_step(model, head, preprocess, tx, cfg, inputs)

  def chunk(state, step0, hyper, batch_idx, pool_images, pool_ages):
    def body(st, xs):
      step, idx = xs
      return lax.cond(step < hyper.max_iter,
                      lambda s: step_fn(s, step, hyper, idx, pool_images, pool_ages),
                      lambda s: (s, jnp.zeros((), jnp.float32)), st)
    steps = step0 + jnp.arange(batch_idx.shape[0])
    return lax.scan(body, state, (steps, batch_idx))

  return chunk


def stack_trees(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any, n: int) -> list[Any]:
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def _vmapped(chunk_fn: Callable, predict_fn: Callable, trial_chunk: int) -> tuple[Callable, Callable]:
  del trial_chunk  # a 'vmap' group is vectorised whole (its size is the chunk)
  return (jax.vmap(chunk_fn, in_axes=(0, None, None, 0, None, None)), jax.vmap(predict_fn, in_axes=(0, 0, None)))


def _mapped(chunk_fn: Callable, predict_fn: Callable, trial_chunk: int) -> tuple[Callable, Callable]:
  batch = trial_chunk or None  # trials vectorised per `lax.map` iteration

  def train(states, step0, hyper, batch_idx, pool_images, pool_ages):
    return lax.map(lambda a: chunk_fn(a[0], step0, hyper, a[1], pool_images, pool_ages), (states, batch_idx),
                   batch_size=batch)

  def predict(params, batch_stats, images):
    return lax.map(lambda a: predict_fn(a[0], a[1], images), (params, batch_stats), batch_size=batch)

  return train, predict


def _lone_trial(chunk_fn: Callable, predict_fn: Callable, trial_chunk: int) -> tuple[Callable, Callable]:
  """'loop' functions on a group (or a device's block) of one trial: the trial axis is taken off, then put back."""
  del trial_chunk
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
  add_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731

  def train(state, step0, hyper, batch_idx, pool_images, pool_ages):
    if batch_idx.shape[0] != 1:  # static: raised while tracing
      raise ValueError(f"a 'loop' program trains one trial per device, got a block of {batch_idx.shape[0]}")
    return add_axis(chunk_fn(first(state), step0, hyper, batch_idx[0], pool_images, pool_ages))

  def predict(params, batch_stats, images):
    return predict_fn(first(params), first(batch_stats), images)[None]

  return train, predict


_BATCHED = {"vmap": _vmapped, "map": _mapped, "loop": _lone_trial}


def batched(chunk_fn: Callable, predict_fn: Callable, strategy: str,
            trial_chunk: int = 0) -> tuple[Callable, Callable]:
  """One trial's chunk and predict functions as functions over a group with a leading trial axis.

  `train(states, step0, hyper, batch_idx[G, K, B], pool_images, pool_ages) -> (states, losses[G, K])` and
  `predict(params, batch_stats, images) -> ages[G, N]`: 'vmap' vectorises the G trials, 'map' runs them
  through `lax.map` (`trial_chunk` vectorised at a time, 0: all), 'loop' takes a group of G = 1."""
  return _BATCHED[strategy](chunk_fn, predict_fn, trial_chunk)


class TrialRunner:
  """Trains the groups of a size (`sharding.group_layout`) one after another, with a chosen strategy.

  Every group has a leading trial axis: 'vmap' groups stack `trial_chunk` trials (all by default), 'map'
  puts all trials through one `lax.map` program (`trial_chunk` vectorised at a time), and a 'loop' group
  holds one trial (one per device on a mesh), so one compiled program serves every size. Only one group's
  state is alive at a time, which bounds memory for large models.

  Groups whose layout has a mesh are stacked straight into global arrays sharded along the 'trial' axis
  (padded with copies of the last trial; the copies are dropped from every output), each trial's batch
  indices are split over the 'data' axis, and pool and test images are replicated. The runner holds only
  caches: its compiled programs (per mesh and argument layout) and replicated inputs.
  `trace_counts[(strategy, group size)]` counts how often the chunk program was traced.
  """

  def __init__(self, chunk_fn: Callable, predict_fn: Callable, strategy: str, trial_chunk: int = 0):
    if strategy not in STRATEGIES:
      raise ValueError(f"unknown trials.parallel {strategy!r}; expected one of {STRATEGIES} or 'auto'")
    self.strategy = strategy
    self.trial_chunk = trial_chunk
    self.trace_counts: collections.Counter[tuple[str, int]] = collections.Counter()
    self._chunk_fn, self._predict_fn = chunk_fn, predict_fn
    self._on_mesh: dict[Any, tuple[Callable, Callable]] = {}
    self._placed: dict[tuple[int, Any], tuple[jax.Array, jax.Array]] = {}
    self._executables: dict[Any, Any] = {}  # mesh programs, compiled ahead of time per argument layout
    train, predict = self._programs(None)
    self._train = jax.jit(train, donate_argnums=0)
    self._predict = jax.jit(predict)

  def layout(self, mesh: sharding_lib.MeshConfig | None, num_trials: int) -> sharding_lib.GroupLayout:
    """The groups of a size of `num_trials` trials under this strategy (`mesh` None: never shard)."""
    return sharding_lib.group_layout(mesh, self.strategy, num_trials, self.trial_chunk)

  def _programs(self, mesh: Any) -> tuple[Callable, Callable]:
    """The train and predict functions of this strategy over a group (per device on its block if `mesh`)."""
    train, predict = batched(self._chunk_fn, self._predict_fn, self.strategy, self.trial_chunk)
    if mesh is not None:
      train, predict = _per_device(train, predict, mesh)

    def counted(state, *args):
      self.trace_counts[(self.strategy, jax.tree.leaves(state)[0].shape[0])] += 1  # runs while tracing only
      return train(state, *args)

    return counted, predict

  def _mesh_programs(self, mesh: Any) -> tuple[Callable, Callable]:
    if mesh not in self._on_mesh:
      trials, replicated = NamedSharding(mesh, P("trial")), NamedSharding(mesh, P())
      train, predict = self._programs(mesh)
      self._on_mesh[mesh] = (jax.jit(train, donate_argnums=0, out_shardings=(trials, replicated)),
                             jax.jit(predict, out_shardings=replicated))
    return self._on_mesh[mesh]

  def _replicated(self, array: jax.Array, mesh: Any) -> jax.Array:
    """`array` replicated over `mesh`, placed once per (array, mesh)."""
    key = (id(array), mesh)
    if key not in self._placed or self._placed[key][0] is not array:
      if len(self._placed) >= 8:  # arrays of earlier studies
        self._placed.clear()
      self._placed[key] = (array, jax.tree.map(lambda a: sharding_lib.to_global(a, NamedSharding(mesh, P())), array))
    return self._placed[key][1]

  def group(self, states: Sequence[TrialState], layout: sharding_lib.GroupLayout) -> TrialState:
    """One group's state from its trials' states: stacked (fresh buffers, which the step donates) and, on the
    layout's mesh, sharded over 'trial' and padded to the group size with copies of the last trial."""
    if not 0 < len(states) <= layout.group_size:
      raise ValueError(f"a group of this layout holds 1 to {layout.group_size} trials, got {len(states)}")
    if layout.mesh is None:
      return stack_trees(states)
    return sharding_lib.stack_to_global(states, NamedSharding(layout.mesh, P("trial")), layout.group_size)

  def ungroup(self, state: TrialState, size: int) -> list[TrialState]:
    """The first `size` trials of a group (padding dropped), as host arrays (PRNG keys stay key arrays).

    The group comes to the host in one transfer: slicing device arrays trial by trial costs one dispatch per
    leaf and trial (34 s of a 160 s demo run). With several processes and a sharded group, every process
    must call it."""
    return unstack_tree(sharding_lib.to_host(state), size)

  def _train_call(self, state: TrialState, batch_idx: np.ndarray, step0: int, hyper: Hyper,
                  pool_images: jax.Array, pool_ages: jax.Array) -> tuple[Callable, tuple]:
    """The program and arguments of one chunk of a group (a sharded group's program compiled ahead of time)."""
    mesh = sharding_lib.mesh_of(state)
    if mesh is None:
      return self._train, (state, jnp.asarray(step0, jnp.int32), hyper, jnp.asarray(batch_idx), pool_images,
                           pool_ages)
    idx = _pad_rows(np.asarray(batch_idx, np.int32), jax.tree.leaves(state)[0].shape[0])
    replicated = NamedSharding(mesh, P())
    scalars = jax.tree.map(lambda x: sharding_lib.to_global(np.asarray(x), replicated), (np.int32(step0), hyper))
    idx = sharding_lib.to_global(idx, NamedSharding(mesh, sharding_lib.index_spec(mesh, idx.shape[-1])))
    train, _ = self._mesh_programs(mesh)
    args = (state, *scalars, idx, self._replicated(pool_images, mesh), self._replicated(pool_ages, mesh))
    return self._executable(train, args), args

  def compile_train(self, state: TrialState, batch_idx: np.ndarray, step0: int, hyper: Hyper,
                    pool_images: jax.Array, pool_ages: jax.Array) -> Any:
    """The compiled chunk program of a group like `state` (for timing compilation apart from running)."""
    program, args = self._train_call(state, batch_idx, step0, hyper, pool_images, pool_ages)
    return program.lower(*args).compile() if program is self._train else program

  def train(self, state: TrialState, batch_idx: np.ndarray, step0: int, hyper: Hyper, pool_images: jax.Array,
            pool_ages: jax.Array) -> tuple[TrialState, np.ndarray]:
    """Advances one group by one chunk of steps; `batch_idx` (trials, K, B) holds its trials' rows (a sharded
    group's padding left out), e.g. `orders[sl]` for a group of slice `sl`.

    Returns the new state and the losses (trials, K) of the trials in `batch_idx`."""
    program, args = self._train_call(state, batch_idx, step0, hyper, pool_images, pool_ages)
    state, loss = program(*args)
    return state, np.asarray(loss)[:len(batch_idx)]

  def predict(self, state: TrialState, images: jax.Array) -> np.ndarray:
    """Predicted ages (group size, N) on one batch of uint8 crops (a sharded group's padding included)."""
    mesh = sharding_lib.mesh_of(state)
    if mesh is None:
      return np.asarray(self._predict(state.params, state.batch_stats, images))
    _, predict = self._mesh_programs(mesh)
    args = (state.params, state.batch_stats, sharding_lib.to_global(images, NamedSharding(mesh, P())))
    return np.asarray(self._executable(predict, args)(*args))

  def _executable(self, jitted: Callable, args: tuple) -> Callable:
    """`jitted` compiled for the layout of `args`, ahead of time; with several processes, they all finish
    compiling before any runs it (its collectives would otherwise time out waiting for a slow compiler)."""
    key = (jitted, tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(args)))
    if key not in self._executables:
      self._executables[key] = jitted.lower(*args).compile()
      sharding_lib.barrier("compiled")
    return self._executables[key]


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """`array` with copies of its last row appended up to `rows` rows."""
  extra = rows - len(array)
  return np.concatenate([array, np.repeat(array[-1:], extra, axis=0)]) if extra > 0 else array


def _per_device(train: Callable, predict: Callable, mesh: Any) -> tuple[Callable, Callable]:
  """Programs over a mesh: every device runs `train` / `predict` on its own block of trials.

  `shard_map` is manual over 'trial' only; the 'data' axis stays automatic, so the compiler still splits a
  trial's batch over it (and sums the gradients). Written per device rather than as a vmap whose trial axis
  the compiler partitions: on CPU that partitioned vmap ran 7x slower than one device (36 vs 256 images/s,
  2 devices, vgg16_tiny), since it keeps the vmapped (grouped) convolutions."""
  trials, same = P("trial"), P()
  per_device = functools.partial(jax.shard_map, mesh=mesh, axis_names={"trial"}, check_vma=False)
  return (per_device(train, in_specs=(trials, same, same, trials, same, same), out_specs=(trials, trials)),
          per_device(predict, in_specs=(trials, trials, same), out_specs=trials))


def evaluate(runner: TrialRunner, state: TrialState, test_images: jax.Array, crop: int | None,
             batch_size: int, size: int | None = None) -> np.ndarray:
  """Predicted ages (group size, Q) of one group on the whole test set, in fixed-size padded batches.

  `size` keeps the first `size` trials (drops a sharded group's padding); `crop` None: the test inputs are
  taken as they are (cached features), else centre-cropped."""
  return predict_padded(lambda batch: runner.predict(state, batch)[:size], test_images, batch_size, crop)


def time_chunk(runner: TrialRunner, mesh: sharding_lib.MeshConfig | None,
               make_states: Callable[[slice], list[TrialState]], orders: np.ndarray, hyper: Hyper,
               pool_images: jax.Array, pool_ages: jax.Array, steps: int = 2) -> float:
  """Estimated seconds per chunk for all trials, measured on the first group (laid out for `mesh`) after
  compilation.

  `orders` is (T, K, B). Only `steps` steps of the chunk execute (the rest are skipped through
  `max_iter`, a real branch since the predicate is not batched), so measuring a slow strategy is cheap.
  """
  num_trials, k = orders.shape[:2]
  layout = runner.layout(mesh, num_trials)
  sl = layout.slices[0]
  state = runner.group(make_states(sl), layout)
  idx = orders[sl]
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
