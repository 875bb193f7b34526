"""Where agejax keeps what it measures, decodes and compiles, and the one atomic JSON writer.

The root is `$AGEJAX_CACHE`, else `~/.cache/agejax`: the strategy and convolution choices
(`agejax.engine.autotune`), decoded images (`agejax.data.cache`) and compiled XLA programs (`xla/`, `agejax.main`).
No JAX import here, so data code can use it cheaply.
"""

import json
import os
from typing import Any


def cache_root() -> str:
  """$AGEJAX_CACHE, else ~/.cache/agejax (an empty variable counts as unset)."""
  return os.environ.get("AGEJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "agejax")


def cache_path(name: str) -> str:
  """`name` under the cache root."""
  return os.path.join(cache_root(), name)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` to `path` atomically (readers never see half a file), making its directory."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_json_cache(path: str) -> dict[str, Any]:
  """A JSON cache written by `write_json`; {} when it is missing or unreadable (it is only a cache)."""
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}
  return out if isinstance(out, dict) else {}
