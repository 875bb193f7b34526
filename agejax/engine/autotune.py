"""Measure once, cache on disk: the trial strategy 'auto' picks, keyed by backend, device, model and shapes."""

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

STRATEGIES = ("vmap", "map", "loop")



def _cache_path() -> str:
  root = os.environ.get("AGEJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "agejax"))
  return os.path.join(root, "auto_strategy.json")


def auto_key(spec: Any, num_trials: int, chunk_steps: int, pool_shape: tuple[int, ...], step_cfg: Any,
             trial_chunk: int) -> str:
  """Cache key of an 'auto' choice: backend, device, model, trial count and shapes."""
  dev = jax.devices()[0]
  blob = json.dumps([jax.default_backend(), dev.device_kind, len(jax.devices()), spec, num_trials, chunk_steps,
                     list(pool_shape), dataclasses.asdict(step_cfg), trial_chunk],
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_candidates() -> tuple[str, ...]:
  """What 'auto' measures by default: all three on accelerators; on a CPU only 'loop', nothing to measure.

  On a CPU (docs/benchmarks.md): 'vmap' ran slowest in every measurement (grouped convolutions); 'map' and
  'loop' train equally fast over the per-core CPU devices, but 'map' compiles a program per trial count
  (per size) where 'loop' compiles one for the whole study, and timing a candidate costs a compile."""
  return ("loop",) if jax.default_backend() == "cpu" else STRATEGIES


def choose_strategy(key: str, measure: Callable[[str], float], candidates: Sequence[str] = STRATEGIES,
                    log: logging.Logger | None = None) -> tuple[str, dict[str, float]]:
  """The fastest strategy for `key` (seconds per chunk from `measure`), cached on disk."""
  if len(candidates) == 1:
    if log:
      log.info("trials.parallel=auto: %r, the only candidate", candidates[0])
    return candidates[0], {}
  key = f"{key}/{'+'.join(candidates)}"
  path = _cache_path()
  cache = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        cache = json.load(f)
    except (OSError, json.JSONDecodeError):
      cache = {}
  if key in cache:
    entry = cache[key]
    if log:
      log.info("trials.parallel=auto: cached choice %r (%s)", entry["choice"], entry["seconds"])
    return entry["choice"], entry["seconds"]
  seconds = {name: measure(name) for name in candidates}
  choice = min(seconds, key=seconds.get)
  cache[key] = {"choice": choice, "seconds": seconds}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(cache, f, indent=1)
  os.replace(tmp, path)
  if log:
    log.info("trials.parallel=auto: measured %s -> %r", {k: round(v, 4) for k, v in seconds.items()}, choice)
  return choice, seconds

