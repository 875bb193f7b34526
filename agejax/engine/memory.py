"""How much device memory T vectorised trials need, and how many fit.

Per trial the step holds its parameters, their gradients, the optimiser state (the updated parameters
overwrite the old through buffer donation) and the activations the backward pass keeps. Activations are
counted from the traced forward pass (nothing is computed): the outputs of its convolutions, matmuls and
pooling, twice (the element-wise values around them that the backward pass also keeps: normalised,
activated). `agejax.bench` prints this estimate beside XLA's own memory analysis of the compiled step.
Shared by all trials: the uint8 image
pool and test set, or a frozen prefix's feature cache (`feature_cache_bytes`, agejax.engine.features).
`trials_that_fit` turns the estimate into the group size the engine vectorises, so 32
VGG-16 trials run on a 16 GB device in chunks and all at once on an 80 GB one.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Headroom for XLA's workspace, fragmentation and what the estimate does not see.
SAFETY = 0.8


@dataclasses.dataclass(frozen=True)
class TrialMemory:
  """Bytes one trial needs, by kind."""

  params: int
  grads: int
  optimizer: int
  batch_stats: int
  activations: int

  @property
  def total(self) -> int:
    return self.params + self.grads + self.optimizer + self.batch_stats + self.activations

  def to_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "total": self.total}


def tree_bytes(tree: Any) -> int:
  """Bytes of every array (or shape/dtype struct) in a pytree."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


HEAVY_PRIMITIVES = ("conv_general_dilated", "dot_general", "reduce_window_max", "reduce_window_sum",
                    "conv_general_dilated_patches")
ELEMENTWISE_FACTOR = 2


def activation_bytes(model: Any, variables: Any, x_shape: tuple[int, ...], dtype: Any = jnp.float32) -> int:
  """Estimated bytes the backward pass keeps from one training-mode forward pass (traced only)."""
  x = jax.ShapeDtypeStruct(x_shape, dtype)

  def forward(v, x):
    return model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])

  jaxpr = jax.make_jaxpr(forward)(variables, x)
  total = 0

  def visit(jx: Any) -> None:
    nonlocal total
    for eqn in jx.eqns:
      heavy = eqn.primitive.name in HEAVY_PRIMITIVES
      if heavy:
        total += tree_bytes([var.aval for var in eqn.outvars])
      for sub in _sub_jaxprs(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return total * ELEMENTWISE_FACTOR


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  """Jaxprs nested in an equation's parameters (pjit, custom_vjp, remat, ...)."""
  found = []
  for value in params.values():
    for item in value if isinstance(value, (list, tuple)) else [value]:
      if hasattr(item, "eqns"):
        found.append(item)
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        found.append(item.jaxpr)
  return found


def estimate_trial_memory(model: Any, variables: Any, opt_state: Any, batch_size: int, crop: int,
                          input_shape: tuple[int, ...] | None = None, input_dtype: Any = jnp.float32) -> TrialMemory:
  """The memory of one trial's training step (on `input_shape` per example, e.g. cached features; default
  a crop x crop x 3 image)."""
  params = tree_bytes(variables["params"])
  shape = (batch_size, *(input_shape or (crop, crop, 3)))
  return TrialMemory(params=params, grads=params, optimizer=tree_bytes(opt_state),
                     batch_stats=tree_bytes(variables.get("batch_stats", {})),
                     activations=activation_bytes(model, variables, shape, input_dtype))


def feature_cache_bytes(num_entries: int, feature_shape: tuple[int, ...], dtype: Any = jnp.float32) -> int:
  """Bytes of a frozen-prefix feature cache: `num_entries` (image, variant) pairs of `feature_shape`."""
  return int(num_entries) * int(np.prod(feature_shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def device_memory_bytes(device: Any | None = None) -> int | None:
  """Memory of one device: the accelerator's limit, or the host's physical memory on CPU."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # not every backend implements memory_stats
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
      return None
  return None


def compiled_bytes(compiled: Any) -> int | None:
  """Arguments + outputs + temporaries of a compiled program, from XLA's memory analysis (None if absent)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def trials_that_fit(per_trial: TrialMemory, budget_bytes: int, shared_bytes: int = 0) -> int:
  """How many trials fit `budget_bytes` together (at least 1: a lone trial that does not fit is XLA's to report)."""
  free = budget_bytes * SAFETY - shared_bytes
  return max(1, int(free // max(per_trial.total, 1)))
