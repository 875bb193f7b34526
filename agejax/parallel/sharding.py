"""Trial groups on the ('trial', 'data') mesh: which mesh a group gets, and global arrays from host data.

One code path serves one process and several (`jax.distributed`): every process holds the same host data
(trial orders and initial states come from seeds), hands its own block to
`jax.make_array_from_process_local_data`, and reads results back from replicated outputs.

`config.mesh` (`MeshConfig`): `trial` devices along the trial axis (0: all devices left after `data` when
the group has at least that many trials, else 1) and `data` devices splitting each trial's batch. A group
whose mesh would have a single device runs unsharded, exactly as without a mesh.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from agejax.errors import ConfigError
from agejax.parallel.mesh import AXES, make_mesh, process_slices


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`config.mesh`: sizes of the 'trial' (0 = automatic) and 'data' axes."""

  trial: int = 0
  data: int = 1

  def __post_init__(self):
    if self.trial < 0 or self.data < 1:
      raise ConfigError(f"config.mesh (trial={self.trial}, data={self.data}): trial >= 0 (0 = auto), data >= 1")

  @classmethod
  def from_config(cls, cfg: Any) -> "MeshConfig":
    section = cfg.get("mesh") or {}
    return cls(int(section.get("trial", 0)), int(section.get("data", 1)))


def trial_axis_size(config: MeshConfig, group_trials: int, num_devices: int) -> int:
  """Devices on the trial axis for a group: `config.trial`, or all devices left after 'data' if the group
  has at least that many trials, else 1."""
  if config.trial:
    return config.trial
  available = max(num_devices // config.data, 1)
  return available if group_trials >= available else 1


@functools.cache
def _mesh(trial: int, data: int) -> Mesh:
  return make_mesh(trial=trial, data=data)


def mesh_for_group(config: MeshConfig | None, group_trials: int) -> Mesh | None:
  """The mesh a group of `group_trials` trials runs on, or None to run it unsharded (one device per process)."""
  if config is None:
    return None
  devices = jax.device_count()
  trial = trial_axis_size(config, group_trials, devices)
  size = trial * config.data
  if size == 1:
    return None
  if size > devices:
    raise ConfigError(f"config.mesh trial={trial} x data={config.data} needs {size} devices; {devices} available")
  if jax.process_count() > 1 and size != devices:
    if config.trial:
      raise ConfigError(f"config.mesh trial={trial} x data={config.data} = {size} devices: with several processes "
                        f"the mesh must span all {devices} devices")
    return None  # a group too small to spread: every process trains it on its own device
  return _mesh(trial, config.data)


@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """How the trials of one size form groups: every group runs on `mesh` (None: unsharded, one device per
  process) and holds up to `group_size` trials (a sharded group is padded to it with copies of its last
  trial, so all groups of the size share one program); `slices` are the groups' trials, in order."""

  mesh: Mesh | None
  group_size: int
  slices: tuple[slice, ...]


def group_layout(config: MeshConfig | None, strategy: str, num_trials: int, trial_chunk: int = 0) -> GroupLayout:
  """The groups of a size of `num_trials` trials under a trial strategy, computed once per size.

  'vmap' groups hold `trial_chunk` trials (0: all); 'map' puts all trials in one group (it maps over them
  `trial_chunk` at a time); a 'loop' group holds one trial per device of the trial axis (the mesh chosen
  for the whole size), one trial unsharded. On a mesh, the group size is a multiple of the trial axis."""
  vmapped = min(trial_chunk or num_trials, num_trials)
  nominal = 1 if strategy == "loop" else num_trials if strategy == "map" else vmapped
  mesh = mesh_for_group(config, num_trials if strategy == "loop" else nominal)
  size = round_up(nominal, 1 if mesh is None else mesh.shape["trial"])
  return GroupLayout(mesh, size, tuple(_groups(num_trials, size)))


def _groups(n: int, size: int) -> list[slice]:
  """Consecutive slices of `n` trials, `size` at a time (all at once if `size` is 0 or over `n`)."""
  size = max(1, min(size or n, n))
  return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def mesh_of(tree: Any) -> Mesh | None:
  """The ('trial', 'data') mesh a pytree's arrays are sharded over, if any."""
  leaves = jax.tree.leaves(tree)
  sharding = getattr(leaves[0], "sharding", None) if leaves else None
  if isinstance(sharding, NamedSharding) and tuple(sharding.mesh.axis_names) == AXES:
    return sharding.mesh
  return None


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from host (or process-local) data that every process holds in full.

  Each process passes only the block its devices hold to `jax.make_array_from_process_local_data`.
  """
  if _is_key(x):
    return jax.random.wrap_key_data(to_global(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
  x = np.asarray(x)
  block = process_slices(sharding, x.shape)
  return jax.make_array_from_process_local_data(sharding, x[block], x.shape)


def stack_to_global(trees: Sequence[Any], sharding: NamedSharding, size: int) -> Any:
  """Stacks per-trial pytrees along a new leading axis of length `size` (padded with copies of the last tree)
  straight into global arrays: each process stacks only the trials its devices hold."""
  trees = list(trees) + [trees[-1]] * (size - len(trees))
  treedef = jax.tree.structure(trees[0])
  columns = zip(*(jax.tree.leaves(t) for t in trees), strict=True)

  def stack(column: tuple[Any, ...]) -> jax.Array:
    if _is_key(column[0]):
      data = stack([jax.random.key_data(x) for x in column])
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(column[0]))
    shape = (size, *np.shape(column[0]))
    block = process_slices(sharding, shape)
    local = np.stack([np.asarray(x) for x in column[block[0]]])[(slice(None), *block[1:])]
    return jax.make_array_from_process_local_data(sharding, local, shape)

  return jax.tree.unflatten(treedef, [stack(c) for c in columns])


def _identity(x: Any) -> Any:
  return x


def to_host(tree: Any) -> Any:
  """Every leaf as a host array (PRNG keys as local key arrays), gathered across processes in one program.

  With several processes, all of them must call it whenever a leaf is sharded over them.
  """
  leaves, treedef = jax.tree.flatten(tree)
  impls = [jax.random.key_impl(x) if _is_key(x) else None for x in leaves]
  data = [jax.random.key_data(x) if impl else x for x, impl in zip(leaves, impls, strict=True)]
  spread = [i for i, x in enumerate(data) if isinstance(x, jax.Array) and not x.is_fully_addressable]
  if spread:
    barrier("to_host")
    everywhere = NamedSharding(data[spread[0]].sharding.mesh, P())
    gathered = jax.jit(_identity, out_shardings=everywhere)([data[i] for i in spread])
    for i, x in zip(spread, gathered, strict=True):
      data[i] = x
  host = [np.asarray(x) for x in data]
  return jax.tree.unflatten(treedef, [jax.random.wrap_key_data(h, impl=impl) if impl else h
                                      for h, impl in zip(host, impls, strict=True)])


def index_spec(mesh: Mesh, batch: int) -> P:
  """Spec of a (trial, steps, batch) index array: trials over 'trial', the batch over 'data' when it divides."""
  data = mesh.shape["data"]
  return P("trial", None, "data") if data > 1 and batch % data == 0 else P("trial")


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits for every process (no-op with one); every process must pass the same barriers in the same order.

  It waits through the coordination service of `jax.distributed`, which tolerates processes arriving minutes
  apart (after uneven work such as compiling or writing files); a CPU (gloo) collective gives up when its
  peers are more than 30 s late, so collectives that may follow uneven work come after a barrier.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # no public barrier without a collective

  _barrier_uses[name] = _barrier_uses.get(name, 0) + 1
  distributed.global_state.client.wait_at_barrier(f"agejax/{name}/{_barrier_uses[name]}", timeout_s * 1000)


_barrier_uses: dict[str, int] = {}


def any_process(flag: bool) -> bool:
  """True in every process if `flag` is true in any (with several processes, every one must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  barrier("any_process")
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))).any())


def same_choice(value: str, choices: Sequence[str]) -> str:
  """Process 0's `value` in every process (e.g. a strategy each process measured on its own)."""
  return same_choices([value], choices)[0]


def same_choices(values: Sequence[str], choices: Sequence[str]) -> list[str]:
  """Process 0's `values` in every process (every process passes as many, e.g. one per convolution)."""
  if jax.process_count() == 1 or not values:
    return list(values)
  barrier("same_choice")
  indices = np.asarray([list(choices).index(v) for v in values], np.int32)
  return [list(choices)[int(i)] for i in np.asarray(multihost_utils.broadcast_one_to_all(indices))]
