"""Measure once, cache on disk: the trial strategy 'auto' picks and the per-layer convolution plan.

Both caches live under `agejax.cachedir.cache_root()`, keyed by backend and device kind, so a second run
measures nothing:
  auto_strategy.json  the fastest of 'vmap' / 'map' / 'loop', per model, trial count and shapes;
  conv_impls.json     seconds per convolution implementation, per convolution signature.

Convolution plan: `plan_model` finds the signature of every 'auto' `Conv2D` of one forward pass
(`jax.eval_shape` under `flax.linen.intercept_methods`, no compute), times each candidate implementation on
it (forward and both gradients inside a two-step `lax.scan`, which is where the engine runs its steps) and
keeps the fastest. The plan then travels in the model spec (`agejax.models.registry.with_conv_plan`), so every
layer holds its own implementation: nothing global is read while tracing and jit caches key on the plan.
A study also writes the plan it used into its workdir (`conv_plan.json`) and follows that file when it runs
there again, so timings measured afresh never change a rerun's numbers. All implementations compute the same
convolution (tests compare values and gradients): a plan changes speed, never results beyond float rounding.
"""

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from agejax.cachedir import cache_path, read_json_cache, write_json
from agejax.models.layers import (
  FALLBACK,
  IMPLS,
  Conv2D,
  Signature,
  conv_nhwc,
  conv_signature,
  resolve_impl,
  signature_from_key,
  signature_key,
)

__all__ = ["FALLBACK", "IMPLS", "STRATEGIES", "Signature", "auto_key", "candidates_for", "choose_strategy",
           "counts_of", "default_candidates", "model_signatures", "plan_model", "read_plan_file", "resolved_impls",
           "time_impl", "tune_signatures", "write_plan_file"]

STRATEGIES = ("vmap", "map", "loop")
log = logging.getLogger(__name__)


def _device_key() -> str:
  return f"{jax.default_backend()}|{jax.devices()[0].device_kind}"


# -- the trial strategy ---------------------------------------------------------------------------------

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
  path = cache_path("auto_strategy.json")
  cache = read_json_cache(path)
  if key in cache:
    entry = cache[key]
    if log:
      log.info("trials.parallel=auto: cached choice %r (%s)", entry["choice"], entry["seconds"])
    return entry["choice"], entry["seconds"]
  seconds = {name: measure(name) for name in candidates}
  choice = min(seconds, key=seconds.get)
  cache[key] = {"choice": choice, "seconds": seconds}
  write_json(path, cache)
  if log:
    log.info("trials.parallel=auto: measured %s -> %r", {k: round(v, 4) for k, v in seconds.items()}, choice)
  return choice, seconds


# -- the convolution plan -------------------------------------------------------------------------------

def _cache_key(sig: Signature) -> str:
  return f"{_device_key()}|{signature_key(sig)}"


def time_impl(sig: Signature, impl: str, repeats: int = 3) -> float:
  """Best seconds of two forward+backward passes of one convolution inside a `lax.scan`."""
  x_shape, k_shape, strides, pads, groups, dtype = sig
  x = jnp.full(x_shape, 0.5, dtype)
  kernel = jnp.full(k_shape, 0.01, dtype)

  def loss(x, kernel):
    return jnp.sum(conv_nhwc(x, kernel, strides, pads, groups, impl).astype(jnp.float32) ** 2)

  grad = jax.grad(loss, (0, 1))

  @jax.jit
  def two_steps(x, kernel):
    def body(carry, _):
      gx, gk = grad(*carry)
      return (carry[0] - 1e-6 * gx, carry[1] - 1e-6 * gk), None
    return lax.scan(body, (x, kernel), None, length=2)[0]

  jax.block_until_ready(two_steps(x, kernel))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(two_steps(x, kernel))
    best = min(best, time.perf_counter() - t0)
  return best


def candidates_for(sig: Signature, impls: Sequence[str] = IMPLS) -> list[str]:
  """Implementations that differ for this signature ('patches' is plain XLA for grouped convs)."""
  groups = sig[4]
  return [i for i in impls if not (i == "patches" and groups != 1)]


def tune_signatures(sigs: Sequence[Signature], impls: Sequence[str] = IMPLS,
                    measure: Callable[[Signature, str], float] = time_impl) -> dict[Signature, str]:
  """The fastest implementation per signature, from the disk cache or measured (and then cached)."""
  path = cache_path("conv_impls.json")
  cache = read_json_cache(path)
  plan, measured = {}, 0
  for sig in dict.fromkeys(sigs):
    key = _cache_key(sig)
    names = candidates_for(sig, impls)
    entry = cache.get(key)
    if entry and set(names) <= set(entry["seconds"]):
      plan[sig] = min(names, key=entry["seconds"].get)
      continue
    seconds = {name: measure(sig, name) for name in names}
    cache[key] = {"seconds": seconds}
    plan[sig] = min(seconds, key=seconds.get)
    measured += 1
    log.info("conv %s x %s stride %s groups %d: %s -> %s", sig[0], sig[1], sig[2], sig[4],
             {k: round(v * 1e3, 2) for k, v in seconds.items()}, plan[sig])
  if measured:
    write_json(path, cache)
  return plan


def _conv_calls(model: nn.Module, variables: Any, x_shape: Sequence[int], dtype: Any) -> list[tuple[Conv2D, Signature]]:
  """(module, signature) of every Conv2D call in one training-mode forward pass, in trace order (shapes only)."""
  calls = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Conv2D) and context.method_name == "__call__":
      x = args[0]
      calls.append((context.module, conv_signature(context.module, x.shape, x.dtype)))
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct(tuple(x_shape), dtype)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                            mutable=["batch_stats"]), variables, x)
  return calls


def model_signatures(model: nn.Module, variables: Any, x_shape: Sequence[int],
                     dtype: Any = jnp.float32) -> list[Signature]:
  """Signatures of the 'auto' convolutions in one training-mode forward pass, distinct, in trace order."""
  return list(dict.fromkeys(sig for conv, sig in _conv_calls(model, variables, x_shape, dtype)
                            if isinstance(conv.impl, str) and conv.impl == "auto"))


def resolved_impls(model: nn.Module, variables: Any, x_shape: Sequence[int],
                   dtype: Any = jnp.float32) -> list[tuple[Signature, str]]:
  """(signature, implementation) that every convolution of one forward pass computes with, in trace order."""
  return [(sig, resolve_impl(conv.impl, sig)) for conv, sig in _conv_calls(model, variables, x_shape, dtype)]


def read_plan_file(path: str) -> dict[Signature, str]:
  """A plan written by `write_plan_file` ({} when the file does not exist)."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      raw = json.load(f)
    plan = {signature_from_key(key): impl for key, impl in raw["plan"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: not a convolution plan written by agejax ({e})") from e
  bad = {v for v in plan.values() if v not in IMPLS}
  if bad:
    raise ValueError(f"{path}: unknown convolution implementations {sorted(bad)}; expected {IMPLS}")
  return plan


def write_plan_file(path: str, plan: dict[Signature, str]) -> None:
  """Merges `plan` into the plan file at `path` (atomically)."""
  merged = {**read_plan_file(path), **plan}
  write_json(path, {"device": _device_key(), "plan": {signature_key(sig): impl for sig, impl in merged.items()}})


def plan_model(model: nn.Module, variables: Any, x_shape: Sequence[int], impls: Sequence[str] = IMPLS,
               plan_file: str | None = None, measure: bool = True) -> dict[Signature, str]:
  """The plan for every 'auto' convolution of `model`, in trace order: measured or read from the cache.

  With `plan_file`, choices already in that file are used as they are (so a run repeats an earlier run's
  numbers exactly, whatever the timings say today) and the plan is merged back into it. With `measure=False`
  nothing is timed, cached or written, and convolutions missing from the file get the fallback. Put the plan
  into the model with `agejax.models.registry.with_conv_plan`."""
  sigs = model_signatures(model, variables, x_shape)
  fixed = read_plan_file(plan_file) if plan_file else {}
  missing = [sig for sig in sigs if sig not in fixed]
  found = tune_signatures(missing, impls) if measure else dict.fromkeys(missing, FALLBACK)
  plan = {sig: fixed.get(sig) or found[sig] for sig in sigs}
  if plan_file and measure:
    write_plan_file(plan_file, plan)
  return plan


def counts_of(plan: dict[Signature, str]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for impl in plan.values():
    counts[impl] = counts.get(impl, 0) + 1
  return counts
