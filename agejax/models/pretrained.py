"""Prior directories: an Orbax checkpoint of a model's variables plus `agejax_prior.json`.

`agejax_prior.json` holds the model spec (see registry.py), the preprocessing the weights expect,
and where the weights came from (format, file name, SHA-256), so every prior is traceable.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from agejax.errors import CheckpointError
from agejax.models.registry import AgeModel, build_model

METADATA_FILE = "agejax_prior.json"
VARIABLES_DIR = "variables"


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Maps RGB uint8 images (N, H, W, 3), already resized and cropped, to the model's input.

  `scale` is the input range the weights expect (255 for Caffe/Keras-caffe, 1 for torchvision);
  `mean` and `std` are in the model's channel order and in that range.
  """

  channel_order: str = "RGB"
  scale: float = 255.0
  mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
  std: tuple[float, float, float] = (1.0, 1.0, 1.0)
  resize: int = 256
  crop: int = 224

  def __post_init__(self):
    if self.channel_order not in ("RGB", "BGR"):
      raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")

  def __call__(self, images: jax.Array) -> jax.Array:
    x = jnp.asarray(images).astype(jnp.float32) * (self.scale / 255.0)
    if self.channel_order == "BGR":
      x = x[..., ::-1]
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
    d = dict(d)
    for k in ("mean", "std"):
      if k in d:
        d[k] = tuple(float(v) for v in d[k])
    return cls(**d)


# Preprocessing conventions of the public checkpoints.
CAFFE_BGR = Preprocess("BGR", 255.0, (104.0, 117.0, 123.0))
KERAS_CAFFE_BGR = Preprocess("BGR", 255.0, (103.939, 116.779, 123.68))
TORCHVISION_RGB = Preprocess("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
VGGFACE_RGB = Preprocess("RGB", 255.0, (129.186, 104.762, 93.594))
LITE_RGB = Preprocess("RGB", 255.0, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0))


def save_pretrained(
    directory: str, spec: Mapping[str, Any], variables: Any, preprocess: Preprocess,
    source: Mapping[str, Any] | None = None,
) -> None:
  """Writes a prior directory (overwrites the variables if they exist)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  ckpt = _checkpointer()
  ckpt.save(os.path.join(directory, VARIABLES_DIR), jax.tree.map(np.asarray, variables), force=True)
  ckpt.wait_until_finished()
  meta = {"model": dict(spec), "preprocess": preprocess.to_dict(), "source": dict(source or {})}
  with open(os.path.join(directory, METADATA_FILE), "w") as f:
    json.dump(meta, f, indent=2, default=_json_default)


def _checkpointer() -> ocp.StandardCheckpointer:
  """An Orbax checkpointer for this process alone (prior directories hold host arrays; with several
  processes, one writes them and any reads them without waiting for the others)."""
  if jax.process_count() == 1:
    return ocp.StandardCheckpointer()
  me = jax.process_index()
  options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  return ocp.StandardCheckpointer(multiprocessing_options=options)


def _json_default(o: Any) -> Any:
  if isinstance(o, (np.integer, np.floating)):
    return o.item()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_prior_metadata(directory: str) -> dict[str, Any]:
  """The parsed `agejax_prior.json` of a prior directory."""
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{directory}: not an agejax prior (no {METADATA_FILE}); create one with agejax.port")
  with open(path) as f:
    return json.load(f)


def load_pretrained(directory: str) -> tuple[AgeModel, Any, Preprocess]:
  """Loads a prior: `logits = model.apply(variables, preprocess(images))`."""
  meta = read_prior_metadata(directory)
  model = build_model(meta["model"])
  variables = _checkpointer().restore(os.path.abspath(os.path.join(directory, VARIABLES_DIR)))
  variables = jax.tree.map(jnp.asarray, variables)
  return model, variables, Preprocess.from_dict(meta["preprocess"])
