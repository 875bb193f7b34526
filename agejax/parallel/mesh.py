"""The ('trial', 'data') device mesh and the shardings trial-parallel code uses.

Independent trials are spread over the 'trial' axis; a trial's batch may be split over the 'data' axis.
Trial-stacked pytrees (leading axis = trial) use `trial_sharding`, (trial, batch, ...) inputs `batch_sharding`.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from agejax.errors import ConfigError

AXES = ("trial", "data")


def make_mesh(trial: int = -1, data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (trial, data) mesh; `trial=-1` takes all devices left after `data`.

  `devices` defaults to all global devices. A mesh smaller than the device list uses its first devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data < 1 or trial == 0 or trial < -1:
    raise ConfigError(f"mesh (trial={trial}, data={data}): sizes must be positive (trial may be -1)")
  if trial == -1:
    if n % data:
      raise ConfigError(f"mesh data={data} does not divide the {n} devices")
    trial = n // data
  if n % (trial * data):
    raise ConfigError(f"mesh trial={trial} x data={data} = {trial * data} does not divide the {n} devices")
  # Auto axes: shardings are hints to the compiler, so trial code written without a mesh in mind still traces.
  return jax.make_mesh((trial, data), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[: trial * data])


def trial_sharding(mesh: Mesh, leading_trial: bool = True) -> NamedSharding:
  """Sharding of a trial-stacked pytree leaf: leading axis over 'trial' (replicated if not `leading_trial`)."""
  return NamedSharding(mesh, P("trial") if leading_trial else P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of (trial, batch, ...) arrays: trials over 'trial', each trial's batch over 'data'."""
  return NamedSharding(mesh, P("trial", "data"))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def shard_tree(tree: Any, sharding: jax.sharding.Sharding | Any) -> Any:
  """Places every leaf of `tree` with `sharding` (one sharding, or a pytree of them matching `tree`)."""
  return jax.device_put(tree, sharding)


def pad_trials(n_trials: int, mesh: Mesh) -> int:
  """`n_trials` rounded up to a multiple of the 'trial' axis size; callers drop the padded dummy trials."""
  size = mesh.shape["trial"]
  return -(-n_trials // size) * size


def process_slices(sharding: NamedSharding, global_shape: Sequence[int]) -> tuple[slice, ...]:
  """The block of a `global_shape` array that this process's devices hold (what it must load locally)."""
  shape = tuple(global_shape)
  blocks = {tuple(ix.indices(size)[:2] for ix, size in zip(idx, shape, strict=True))
            for idx in sharding.addressable_devices_indices_map(shape).values()}
  box = tuple(slice(min(b[d][0] for b in blocks), max(b[d][1] for b in blocks)) for d in range(len(shape)))
  if sum(math.prod(e - s for s, e in b) for b in blocks) != math.prod(s.stop - s.start for s in box):
    raise ValueError(f"this process's devices do not hold one contiguous block of {shape} under {sharding.spec}")
  return box


def global_batch_from_local(
    local_array: np.ndarray | jax.Array,
    mesh: Mesh,
    spec: P,
    global_shape: Sequence[int] | None = None,
) -> jax.Array:
  """A global array from this process's block (see `process_slices`); each process passes its own block."""
  return jax.make_array_from_process_local_data(
      NamedSharding(mesh, spec), local_array, None if global_shape is None else tuple(global_shape)
  )
