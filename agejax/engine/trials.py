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
  make_train_step,
  sample_order,
)
from agejax.models.pretrained import Preprocess
from agejax.parallel import sharding as sharding_lib


def make_train_chunk(model: Any, head: str, preprocess: Preprocess, optimizer: Any, cfg: StepConfig,
                     inputs: Inputs | None = None) -> Callable[..., tuple[TrialState, jax.Array]]:
  """`chunk(state, step0, hyper, batch_idx[K, B], pool_images, pool_ages) -> (state, losses[K])` for ONE trial.

  Steps at or past `hyper.max_iter` leave the state unchanged (loss reported as 0), so the last chunk of
  a size may be partial without another compilation.
  """
  step_fn = make_train_step(model, head, preprocess, optimizer, cfg, inputs)

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


def _groups(n: int, size: int) -> list[slice]:
  size = max(1, min(size or n, n))
  return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class TrialRunner:
  """Trains the T trials of one size in groups, one group after another, with a chosen strategy.

  'loop' groups hold one unstacked trial; 'vmap' groups stack `trial_chunk` trials (all by default);
  'map' puts all trials through one `lax.map` program (`trial_chunk` vectorised at a time). Only one
  group's state is alive at a time, which bounds memory for large models.

  With a `mesh` config (`agejax.parallel.sharding.MeshConfig`), groups that get a mesh of several devices
  are stacked straight into global arrays sharded along the 'trial' axis (padded with copies of the last
  trial to a multiple of its size; the copies are dropped from every output), each trial's batch indices
  are split over the 'data' axis, and pool and test images are replicated. A 'loop' group then holds one
  trial per device of the trial axis, so one compiled program serves every size.
  `trace_counts[(strategy, group size)]` counts how often the chunk program was traced.
  """

  def __init__(self, chunk_fn: Callable, predict_fn: Callable, strategy: str, trial_chunk: int = 0,
               mesh: Any = None):
    if strategy not in STRATEGIES:
      raise ValueError(f"unknown trials.parallel {strategy!r}; expected one of {STRATEGIES} or 'auto'")
    self.strategy = strategy
    self.trial_chunk = trial_chunk
    self.mesh_config = mesh
    self.trace_counts: collections.Counter[tuple[str, int]] = collections.Counter()
    self._chunk_fn, self._predict_fn = chunk_fn, predict_fn
    self._on_mesh: dict[Any, tuple[Callable, Callable]] = {}
    self._placed: dict[tuple[int, Any], tuple[jax.Array, jax.Array]] = {}
    self._sized: tuple[Any, int] | None = None  # (mesh, padded group size) of the size `slices` last split
    self._executables: dict[Any, Any] = {}  # mesh programs, compiled ahead of time per argument layout
    train, predict = self._programs(None)
    self._train = jax.jit(train, donate_argnums=0)
    self._predict = jax.jit(predict)

  def set_mesh(self, mesh: Any) -> None:
    """Sets the `MeshConfig` used by groups formed from now on (None: never shard)."""
    self.mesh_config = mesh

  def _count(self, state: TrialState, stacked: bool) -> None:  # runs while tracing only
    size = jax.tree.leaves(state)[0].shape[0] if stacked else 1
    self.trace_counts[(self.strategy, size)] += 1

  def _programs(self, mesh: Any) -> tuple[Callable, Callable]:
    """The train and predict functions of this strategy (run per device on its block of trials if `mesh`)."""
    chunk_fn, predict_fn = self._chunk_fn, self._predict_fn
    if self.strategy == "loop":
      train, predict = (chunk_fn, predict_fn) if mesh is None else _lone_trial(chunk_fn, predict_fn)
    elif self.strategy == "vmap":
      train = jax.vmap(chunk_fn, in_axes=(0, None, None, 0, None, None))
      predict = jax.vmap(predict_fn, in_axes=(0, 0, None))
    else:
      batch = self.trial_chunk or None

      def train(states, step0, hyper, batch_idx, pool_images, pool_ages):
        return lax.map(lambda a: chunk_fn(a[0], step0, hyper, a[1], pool_images, pool_ages), (states, batch_idx),
                       batch_size=batch)

      def predict(p, b, x):
        return lax.map(lambda a: predict_fn(a[0], a[1], x), (p, b), batch_size=batch)

    if mesh is not None:
      train, predict = _per_device(train, predict, mesh)

    stacked = self.strategy != "loop" or mesh is not None

    def counted(state, *args):
      self._count(state, stacked)
      return train(state, *args)

    return counted, predict

  def _mesh_programs(self, mesh: Any) -> tuple[Callable, Callable]:
    if mesh not in self._on_mesh:
      trials, replicated = NamedSharding(mesh, P("trial")), NamedSharding(mesh, P())
      train, predict = self._programs(mesh)
      self._on_mesh[mesh] = (jax.jit(train, donate_argnums=0, out_shardings=(trials, replicated)),
                             jax.jit(predict, out_shardings=replicated))
    return self._on_mesh[mesh]

  def _group_mesh(self, group_trials: int) -> Any:
    if self.mesh_config is None:
      return None
    return sharding_lib.mesh_for_group(self.mesh_config, group_trials)

  def _replicated(self, array: jax.Array, mesh: Any) -> jax.Array:
    """`array` replicated over `mesh`, placed once per (array, mesh)."""
    key = (id(array), mesh)
    if key not in self._placed or self._placed[key][0] is not array:
      if len(self._placed) >= 8:  # arrays of earlier studies
        self._placed.clear()
      self._placed[key] = (array, jax.tree.map(lambda a: sharding_lib.to_global(a, NamedSharding(mesh, P())), array))
    return self._placed[key][1]

  def _layout(self, group_trials: int) -> tuple[Any, int]:
    """(mesh or None, padded group size) for groups of up to `group_trials` trials ('loop': for a size of
    `group_trials` trials, whose groups hold one trial per device)."""
    mesh = self._group_mesh(group_trials)
    if self.strategy == "loop":
      return mesh, 1 if mesh is None else mesh.shape["trial"]
    return mesh, group_trials if mesh is None else sharding_lib.round_up(group_trials, mesh.shape["trial"])

  def _stacked(self) -> bool:
    """Whether the groups of the size `slices` last split are stacked (all but single-device 'loop')."""
    return self.strategy != "loop" or (self._sized is not None and self._sized[0] is not None)

  def slices(self, num_trials: int) -> list[slice]:
    """The groups of trials run together (one compiled program serves groups of one size).

    With a mesh, every group of the size is padded to the first one's size, so they share one program."""
    if self.strategy == "loop":
      self._sized = self._layout(num_trials)
      return _groups(num_trials, self._sized[1])
    nominal = min(self.trial_chunk or num_trials, num_trials) if self.strategy == "vmap" else num_trials
    self._sized = self._layout(nominal)
    return _groups(num_trials, self._sized[1])

  def group(self, states: Sequence[TrialState]) -> TrialState:
    """One group's state from its trials' states (stacked unless single-device 'loop'; sharded if the group
    gets a mesh)."""
    layout = self._sized
    mesh, size = layout if layout and layout[0] is not None and len(states) <= layout[1] else self._layout(len(states))
    if mesh is None and self.strategy == "loop":
      if len(states) != 1:
        raise ValueError(f"a single-device 'loop' group holds one trial, got {len(states)}")
      return jax.tree.map(jnp.copy, states[0])  # own copy: the step donates it, and trials share the prior's buffers
    if mesh is None:
      return stack_trees(states)
    return sharding_lib.stack_to_global(states, NamedSharding(mesh, P("trial")), size)

  def ungroup(self, state: TrialState, size: int) -> list[TrialState]:
    """The first `size` trials of a group (padding dropped), as host arrays (PRNG keys stay key arrays).

    The group comes to the host in one transfer: slicing device arrays trial by trial costs one dispatch per
    leaf and trial (34 s of a 160 s demo run). With several processes and a sharded group, every process
    must call it."""
    if self.strategy == "loop" and sharding_lib.mesh_of(state) is None:
      return [state]
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
    """Advances one group by one chunk of steps; `batch_idx` is (group, K, B) ((K, B): a single-device 'loop').

    Returns the new state and the losses (group size, K) of the trials in `batch_idx` (padding dropped)."""
    program, args = self._train_call(state, batch_idx, step0, hyper, pool_images, pool_ages)
    state, loss = program(*args)
    loss = np.asarray(loss)
    return state, (loss[None] if np.ndim(batch_idx) == 2 else loss[:len(batch_idx)])  # 2: a lone 'loop' trial

  def group_rows(self, array: np.ndarray, sl: slice) -> np.ndarray:
    """A group's slice of a per-trial array (the lone trial's row for a single-device 'loop')."""
    return array[sl] if self._stacked() else array[sl.start]

  def predict(self, state: TrialState, images: jax.Array) -> np.ndarray:
    """Predicted ages (group size, N) on one batch of uint8 crops (a sharded group's padding included)."""
    mesh = sharding_lib.mesh_of(state)
    if mesh is None:
      out = np.asarray(self._predict(state.params, state.batch_stats, images))
      return out[None] if self.strategy == "loop" else out
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


def _lone_trial(chunk_fn: Callable, predict_fn: Callable) -> tuple[Callable, Callable]:
  """'loop' functions on a device's block of a one-trial-per-device group (a block of one trial)."""
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
  add_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731

  def train(state, step0, hyper, batch_idx, pool_images, pool_ages):
    return add_axis(chunk_fn(first(state), step0, hyper, batch_idx[0], pool_images, pool_ages))

  def predict(params, batch_stats, images):
    return predict_fn(first(params), first(batch_stats), images)[None]

  return train, predict


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
  q = test_images.shape[0]
  preds = []
  for start in range(0, q, batch_size):
    batch = test_images[start:start + batch_size]
    n = batch.shape[0]
    if n < batch_size:  # pad so every batch has one shape and compiles once
      batch = jnp.concatenate([batch, jnp.repeat(batch[-1:], batch_size - n, axis=0)])
    preds.append(runner.predict(state, batch if crop is None else center_crop(batch, crop))[:size, :n])
  return np.concatenate(preds, axis=1)



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

