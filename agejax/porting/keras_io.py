"""Reading legacy Keras HDF5 weight files (Keras 1, 2 and 3 `.h5`) as ordered numpy arrays."""

import os
import re
from typing import Any

import numpy as np

from agejax.errors import CheckpointError

SHORT_NAMES = ("depthwise_kernel", "kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")
# Keras 1 suffixes ('block1_conv1_W_1:0') and their Keras 2+ names.
KERAS1_NAMES = {"W": "kernel", "b": "bias", "gamma": "gamma", "beta": "beta",
                "running_mean": "moving_mean", "running_std": "moving_variance",
                "depthwise_kernel": "depthwise_kernel"}


def _import_h5py() -> Any:
  try:
    import h5py
  except ImportError as e:
    raise CheckpointError("reading Keras .h5 files needs h5py: pip install -r requirements-port.txt") from e
  return h5py


def _text(n: Any) -> str:
  return n.decode("utf8") if isinstance(n, bytes) else str(n)


def read_name_list(group: Any, name: str) -> list[str] | None:
  """A list attribute that Keras may have split into chunks `name0`, `name1`, ...; None if absent."""
  if name in group.attrs:
    return [_text(n) for n in np.atleast_1d(group.attrs[name])]
  if f"{name}0" not in group.attrs:
    return None
  out, chunk = [], 0
  while f"{name}{chunk}" in group.attrs:
    out.extend(_text(n) for n in np.atleast_1d(group.attrs[f"{name}{chunk}"]))
    chunk += 1
  return out


def short_weight_name(name: str) -> str:
  """'block1_conv1/kernel:0', 'block1_conv1/kernel' or 'block1_conv1_W_1:0' -> 'kernel'."""
  base = name.split("/")[-1].split(":")[0]
  for short in SHORT_NAMES:
    if re.fullmatch(rf"{short}(_\d+)?", base):
      return short
  stem = re.sub(r"_\d+$", "", base)
  for old, short in sorted(KERAS1_NAMES.items(), key=lambda kv: -len(kv[0])):
    if stem == old or stem.endswith("_" + old):
      return short
  return base


def read_h5_weights(path: str) -> dict[str, list[tuple[str, np.ndarray]]]:
  """{layer: [(short weight name, array), ...]} in file order; layers without weights are left out.

  Reads weights-only files (`model.save_weights`) and full-model files (group `model_weights`).
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such weights file")
  h5py = _import_h5py()
  try:
    with h5py.File(path, "r") as f:
      root = f["model_weights"] if "model_weights" in f else f
      layer_names = read_name_list(root, "layer_names")
      if layer_names is None:
        raise CheckpointError(f"{path}: not a Keras weights file (no 'layer_names' attribute)")
      layers = {}
      for layer in layer_names:
        if layer not in root:
          raise CheckpointError(f"{path}: layer {layer!r} is listed but has no group")
        group = root[layer]
        names = read_name_list(group, "weight_names") or []
        weights = []
        for wname in names:
          if wname not in group:
            raise CheckpointError(f"{path}: weight {wname!r} of layer {layer!r} is listed but missing")
          weights.append((short_weight_name(wname), np.asarray(group[wname], dtype=np.float32)))
        if weights:
          layers[layer] = weights
  except CheckpointError:
    raise
  except (OSError, KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: not a readable Keras HDF5 file (truncated or another format?): {e}") from e
  return layers
