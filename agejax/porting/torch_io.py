"""Reading PyTorch checkpoints as plain numpy state dicts, without a full unpickle."""

import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from agejax.errors import CheckpointError

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def import_torch() -> Any:
  """The torch module, or an error saying how to install the porting extras."""
  try:
    import torch
  except ImportError as e:
    raise CheckpointError("reading PyTorch checkpoints needs torch: pip install -r requirements-port.txt") from e
  return torch


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
  for key in WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping):
      return obj[key]
  return obj


def _strip_prefix(state: dict[str, np.ndarray], prefix: str = "module.") -> dict[str, np.ndarray]:
  # nn.DataParallel saves every key under 'module.'.
  if state and all(k.startswith(prefix) for k in state):
    return {k[len(prefix):]: v for k, v in state.items()}
  return state


def _load_reason(e: Exception) -> str:
  """torch.load's reason in one line, without its advice to retry with weights_only=False (that would run
  code from the file, which agejax never does)."""
  text = str(e)
  if "WeightsUnpickler error:" in text:  # the weights-only unpickler's own reason follows this marker
    detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
    return f"{type(e).__name__}: {detail[0].strip() if detail else 'unsupported pickle content'}"
  if "weights_only" in text:
    return f"{type(e).__name__}: the weights-only unpickler rejected it"
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: float32 array} from a torch .pth/.pt file (zip or legacy format), tensors only.

  Accepts a bare state dict or one wrapped under 'state_dict' / 'model'; drops BatchNorm's
  `num_batches_tracked` counters.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such checkpoint file")
  torch = import_torch()
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
          AttributeError, KeyError, TypeError, IndexError) as e:
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (truncated or another format?): "
                          f"{_load_reason(e)}") from e
  state = {}
  for key, value in _unwrap(obj, path).items():
    if key.endswith("num_batches_tracked") or not isinstance(value, torch.Tensor):
      continue
    state[str(key)] = value.detach().to(torch.float32).numpy()
  if not state:
    raise CheckpointError(f"{path}: the checkpoint holds no tensors")
  return _strip_prefix(state)
