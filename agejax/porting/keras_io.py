"""Reading legacy Keras HDF5 weight files (Keras 1, 2 and 3 `.h5`) as ordered numpy arrays, and the layer
graph (`model_config`) of full-model files, so that layers can be matched by their place in the topology
rather than by their auto-generated names (`conv2d_10` sorts before `conv2d_2`)."""

import dataclasses
import json
import os
import re
from collections.abc import Mapping
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


def flat_weights(layers: Mapping[str, list[tuple[str, np.ndarray]]], path: str) -> dict[str, np.ndarray]:
  """{'layer/short_name': array} from `read_h5_weights`' output; two weights of one layer alike named are an error."""
  flat = {}
  for layer, weights in layers.items():
    for short, value in weights:
      key = f"{layer}/{short}"
      if key in flat:
        raise CheckpointError(f"{path}: layer {layer} has two weights named {short!r}")
      flat[key] = value
  return flat


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """One layer of a functional model's `model_config`: its class, config and the layers it takes input from."""

  name: str
  class_name: str
  config: dict[str, Any]
  inbound: tuple[str, ...]


def read_model_config(path: str) -> dict[str, Any] | None:
  """The parsed root attribute `model_config` of a Keras full-model HDF5 file (None for weights-only files)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such weights file")
  h5py = _import_h5py()
  try:
    with h5py.File(path, "r") as f:
      raw = f.attrs.get("model_config")
  except (OSError, KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: not a readable Keras HDF5 file (truncated or another format?): {e}") from e
  if raw is None:
    return None
  try:
    config = json.loads(_text(raw))
  except ValueError as e:
    raise CheckpointError(f"{path}: its model_config attribute is not valid JSON: {e}") from e
  if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
    raise CheckpointError(f"{path}: its model_config has no 'config' object")
  return config


def _inbound_names(layer: dict[str, Any], path: str) -> tuple[str, ...]:
  """Input layer names of a layer's first call, in the Keras 2 (nested lists) or Keras 3 (keras_history) form."""
  nodes = layer.get("inbound_nodes") or []
  if len(nodes) > 1:
    raise CheckpointError(f"{path}: layer {layer.get('name')!r} is called {len(nodes)} times (shared layers are "
                          "not supported)")
  if not nodes:
    return ()
  node = nodes[0]
  names: list[str] = []

  def walk(obj: Any) -> None:
    if isinstance(obj, dict):
      if "keras_history" in obj.get("config", {}):  # Keras 3: {"class_name": "__keras_tensor__", ...}
        names.append(str(obj["config"]["keras_history"][0]))
        return
      for v in obj.values():
        walk(v)
    elif isinstance(obj, list):
      if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):  # Keras 2: [name, node, tensor, {}]
        names.append(obj[0])
        return
      for v in obj:
        walk(v)

  walk(node)
  return tuple(names)


def keras_topology(config: dict[str, Any], path: str) -> tuple[dict[str, KerasLayer], list[str], list[str]]:
  """({name: layer} in config order, input layer names, output layer names) of a functional `model_config`."""
  if config.get("class_name") not in ("Model", "Functional"):
    raise CheckpointError(f"{path}: model_config describes a {config.get('class_name')!r}; a functional "
                          "model (class 'Model' or 'Functional') was expected")
  body = config["config"]
  layers: dict[str, KerasLayer] = {}
  for layer in body.get("layers", []):
    name = str(layer.get("name") or layer.get("config", {}).get("name"))
    if name in layers:
      raise CheckpointError(f"{path}: model_config has two layers named {name!r}")
    layers[name] = KerasLayer(name, str(layer.get("class_name")), dict(layer.get("config") or {}),
                              _inbound_names(layer, path))
  for layer in layers.values():
    for src in layer.inbound:
      if src not in layers:
        raise CheckpointError(f"{path}: layer {layer.name!r} takes input from {src!r}, which model_config lacks")

  def ends(key: str) -> list[str]:
    items = body.get(key) or []
    if items and isinstance(items[0], str):  # a single [name, node, tensor] triple
      items = [items]
    return [str(i[0]) for i in items]

  return layers, ends("input_layers"), ends("output_layers")
