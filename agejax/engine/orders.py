"""The order in which a run visits its images, drawn on the host with numpy only (no JAX), so a study's plan
(agejax.experiments.plan) can be built and tested without a device."""

import numpy as np


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
