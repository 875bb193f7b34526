"""Random model variables drawn with numpy, for tests that need weights but not jax.random."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, image_size: int, seed: int = 0):
  """Variables shaped like `model.init`'s, drawn with numpy (XLA:CPU takes seconds to compile jax.random)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, image_size, image_size, 3),
                                                                                jnp.float32))

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "var" in name or "scale" in name:
      return np.ones(s.shape, np.float32)
    if len(s.shape) < 2:
      return np.zeros(s.shape, np.float32)
    return (rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)
