"""Strict assembly of Flax variables from converted checkpoint arrays.

A converter produces a flat mapping {'params/backbone/conv1_1/kernel': array, ...} in Flax layout;
`fill_variables` places it into the model's own variable tree and refuses anything partial:
a missing layer, an extra layer, or a shape mismatch is an error naming the layer and both shapes.
"""

from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from agejax.errors import CheckpointError


def flatten_variables(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} view of a nested dict of variables."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def fill_variables(abstract: Any, converted: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
  """Returns a variables tree shaped like `abstract` holding the converted arrays, or raises."""
  want = flatten_variables(abstract)
  missing = sorted(set(want) - set(converted))
  extra = sorted(set(converted) - set(want))
  problems = []
  if missing:
    problems.append(f"missing in checkpoint: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
  if extra:
    problems.append(f"not in the model: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
  for name in sorted(set(want) & set(converted)):
    w_shape, c_shape = tuple(want[name].shape), tuple(np.shape(converted[name]))
    if w_shape != c_shape:
      problems.append(f"layer {name}: checkpoint shape {c_shape} != model shape {w_shape}")
  if problems:
    raise CheckpointError(f"{source} does not fit the architecture:\n  " + "\n  ".join(problems))
  flat = {tuple(k.split("/")): np.asarray(converted[k], dtype=np.dtype(want[k].dtype)
                                          if hasattr(want[k], "dtype") else np.float32) for k in want}
  return flax.traverse_util.unflatten_dict(flat)


def abstract_variables(model: Any, image_size: int, **apply_kwargs: Any) -> Any:
  """Shapes of a model's variables for a square RGB input, without allocating them."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(x.shape, x.dtype), **apply_kwargs))


def unused_keys_error(source: str, unused: list[str]) -> CheckpointError:
  """An error for checkpoint entries no layer consumed (an extra layer, another architecture)."""
  head = ", ".join(sorted(unused)[:8])
  return CheckpointError(f"{source}: {len(unused)} checkpoint entries match no layer of the model: {head}")
