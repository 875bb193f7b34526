"""Checkpoints inside a training-set size (Orbax `CheckpointManager`) and stopping cleanly on SIGTERM.

A size's trials train group by group, chunk by chunk. `SizeCheckpoints` keeps, in
`workdir/ckpt/PRIOR/nNNNNN/`, the last `config.checkpoint.keep` of: the running group's state (if a group is
mid-way), the losses and test predictions so far, and where training stands (group, next step). Trial orders are
drawn on the host from seeds, so the step index is the whole input state. A rerun of the same command restores
the latest one and continues; the results equal those of an uninterrupted run. A checkpoint written under
another configuration (its fingerprint differs) is discarded with a warning. Every process takes part in
saves; with several processes the state is saved as the global sharded arrays it is.

`config.checkpoint`: enabled, every_chunks (save every N chunks, and at the end of every group but the last),
every_steps (the single-model trainer `fit`: save every N optimiser steps), keep, async_save (write in the
background; waited for before the next save's commit and before exit).

`FitCheckpoints` does the same for one model trained by `agejax.engine.fit.fit` (a pre-training stage): its
state, the best state so far, the history, and the Grain iterator's state when it reads through Grain.

`StopOnSignal` turns SIGTERM into a request that training honours at the next chunk boundary: it saves a
checkpoint and raises `Preempted`; `python -m agejax.main` then exits with status `EXIT_PREEMPTED` (75).
"""

import dataclasses
import logging
import os
import shutil
import signal
import threading
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from agejax.errors import AgejaxError
from agejax.parallel import sharding as sharding_lib

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: stopped on request after a checkpoint; rerun to continue
_ITEMS = ("meta", "host", "state")


class Preempted(AgejaxError):
  """Training stopped on request (SIGTERM) after saving a checkpoint."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """`config.checkpoint`."""

  enabled: bool = True
  every_chunks: int = 10
  every_steps: int = 500
  keep: int = 2
  async_save: bool = True

  @classmethod
  def from_config(cls, cfg: Any) -> "CheckpointConfig":
    section = dict(cfg.get("checkpoint") or {})
    out = cls(**{f.name: type(f.default)(section[f.name]) for f in dataclasses.fields(cls) if f.name in section})
    if min(out.every_chunks, out.every_steps, out.keep) < 1:
      raise AgejaxError(f"config.checkpoint: every_chunks ({out.every_chunks}), every_steps ({out.every_steps}) and "
                        f"keep ({out.keep}) must be >= 1")
    return out


# -- stopping on SIGTERM -------------------------------------------------------------------------------


class StopOnSignal:
  """While active, SIGTERM sets a flag (checked at chunk boundaries) instead of killing the process."""

  _active: "StopOnSignal | None" = None

  def __init__(self, signum: int = signal.SIGTERM):
    self.signum = signum
    self.flag = False
    self._previous: Any = None

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.flag = True
    log.warning("signal %d received: stopping at the next chunk boundary after a checkpoint", signum)

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(self.signum, self._handle)
    StopOnSignal._active = self
    return self

  def __exit__(self, *exc: Any) -> None:
    StopOnSignal._active = None
    if self._previous is not None:
      signal.signal(self.signum, self._previous)


def stop_requested() -> bool:
  """Whether a stop was requested in any process (every process must call it at the same points)."""
  active = StopOnSignal._active
  return sharding_lib.any_process(bool(active and active.flag))


# -- what goes into a checkpoint -----------------------------------------------------------------------


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _local_in_multiprocess(x: Any) -> bool:
  """A per-process (not global) array while several processes run: saved as the host copy process 0 holds."""
  return jax.process_count() > 1 and (not isinstance(x, jax.Array) or x.is_fully_addressable)


def _saveable(x: Any) -> Any:
  if _is_key(x):
    x = jax.random.key_data(x)
  return np.asarray(x) if _local_in_multiprocess(x) or not isinstance(x, jax.Array) else x


def _target(x: Any) -> Any:
  """What to restore a leaf shaped like `x` into (shape, dtype and sharding of the template)."""
  if _is_key(x):
    x = jax.random.key_data(x)
  if _local_in_multiprocess(x) or not isinstance(x, jax.Array):
    return np.zeros(np.shape(x), np.asarray(x).dtype if not isinstance(x, jax.Array) else x.dtype)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _restored(template: Any, value: Any) -> Any:
  if isinstance(template, jax.Array) and not isinstance(value, jax.Array):
    sharding = (jax.random.key_data(template) if _is_key(template) else template).sharding
    value = jax.device_put(value, sharding)
  if _is_key(template):
    value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(template))
  return value


def _flat(tree: Any, fn: Any) -> dict[str, Any]:
  return {f"{i:05d}": fn(x) for i, x in enumerate(jax.tree.leaves(tree))}


class SizeCheckpoints:
  """The checkpoints of one (prior, size): save, find the latest that fits, restore, clean up."""

  item_names: tuple[str, ...] = _ITEMS

  def __init__(self, directory: str, config: CheckpointConfig, fingerprint: Mapping[str, Any]):
    self.directory = os.path.abspath(directory)
    self.fingerprint = dict(fingerprint)
    self.config = config
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True,
                                           enable_async_checkpointing=config.async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.item_names)

  def latest(self) -> dict[str, Any] | None:
    """The latest checkpoint's metadata (with its `step`), or None; a foreign one is deleted."""
    sharding_lib.barrier("ckpt")  # Orbax synchronises with collectives: start them together
    step = self.manager.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("fingerprint") != self.fingerprint:
      log.warning("checkpoints in %s were written with another configuration (%s != %s): starting the size over",
                  self.directory, meta.get("fingerprint"), self.fingerprint)
      for s in self.manager.all_steps():
        self.manager.delete(s)
      return None
    return {**meta, "step": step}

  def save(self, step: int, meta: Mapping[str, Any], host: Mapping[str, np.ndarray], state: Any = None) -> None:
    """Saves (in the background if async) where training stands; `host` arrays are copied first."""
    items = {"meta": ocp.args.JsonSave({**meta, "fingerprint": self.fingerprint, "has_state": state is not None}),
             "host": ocp.args.StandardSave({k: np.array(v, copy=True) for k, v in host.items()})}
    if state is not None:
      items["state"] = ocp.args.StandardSave(_flat(state, _saveable))
    sharding_lib.barrier("ckpt")
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_host(self, step: int, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    target = {k: np.zeros_like(v) for k, v in like.items()}
    out = self.manager.restore(step, args=ocp.args.Composite(host=ocp.args.StandardRestore(target)))["host"]
    return {k: np.asarray(v) for k, v in out.items()}

  def restore_state(self, step: int, like: Any) -> Any:
    """The saved group state, placed like `like` (a freshly formed group of the same trials)."""
    target = _flat(like, _target)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    leaves = [_restored(t, out[k]) for t, k in zip(jax.tree.leaves(like), sorted(out), strict=True)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    sharding_lib.barrier("ckpt")
    self.manager.wait_until_finished()
    self.manager.close()


@dataclasses.dataclass(frozen=True)
class FitCheckpointing:
  """Where `fit` keeps its checkpoints: `directory`, `config` (every_steps, keep, async_save) and the
  `fingerprint` of what defines the run (fit adds its own: steps, batch, seed, loader)."""

  directory: str
  config: CheckpointConfig = CheckpointConfig()
  fingerprint: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class FitCheckpoints(SizeCheckpoints):
  """The checkpoints of one `fit` run: metadata, the best state so far (`host`, host arrays), the training
  state and, on the Grain path, the iterator's state (Grain's Orbax handler: one JSON file per process)."""

  item_names = (*_ITEMS, "loader")

  def save_fit(self, step: int, meta: Mapping[str, Any], best: Any, state: Any,
               loader: grain.DatasetIterator | None) -> None:
    """Saves at `step`: `best` (a pytree of host arrays, or None before the first validation), `state`, and
    `loader`'s position (None on the device path)."""
    items = {"meta": ocp.args.JsonSave({**meta, "fingerprint": self.fingerprint, "has_best": best is not None,
                                        "has_loader": loader is not None}),
             "state": ocp.args.StandardSave(_flat(state, _saveable))}
    if best is not None:
      items["host"] = ocp.args.StandardSave(_flat(best, lambda x: np.array(x, copy=True)))
    if loader is not None:
      items["loader"] = grain.checkpoint.CheckpointSave(loader)
    sharding_lib.barrier("ckpt")
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_best(self, step: int, like: Any) -> Any:
    """The saved best state as host arrays, structured like `like`."""
    flat = self.restore_host(step, _flat(like, np.asarray))
    return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in sorted(flat)])

  def restore_loader(self, step: int, loader: grain.DatasetIterator) -> grain.DatasetIterator:
    """`loader` (a fresh iterator of the same pipeline) moved to where the saved one stood."""
    args = ocp.args.Composite(loader=grain.checkpoint.CheckpointRestore(loader))
    return self.manager.restore(step, args=args)["loader"]


def remove_checkpoints(directory: str) -> None:
  """Deletes a finished size's checkpoints (process 0, after every process got there) and empty parents."""
  sharding_lib.barrier(f"remove:{directory}")
  if jax.process_index() != 0:
    return
  shutil.rmtree(directory, ignore_errors=True)
  parent = os.path.dirname(directory)
  for _ in range(2):  # ckpt/PRIOR, then ckpt
    try:
      os.rmdir(parent)
    except OSError:
      break
    parent = os.path.dirname(parent)
