"""Per-layer choice of convolution implementation, by measurement, cached per backend and device.

A `Conv2D` built with `impl='auto'` looks its signature (input shape, kernel shape, strides, pads,
groups, dtype) up in the active plan when it is traced. `tune_model` fills the plan before the engine
compiles anything: it records every convolution signature of one forward pass (`jax.eval_shape`, no
compute), times each candidate implementation on it (forward and both gradients, inside a two-step
`lax.scan`, which is where the engine runs its steps), and keeps the fastest. Choices are cached in
`$AGEJAX_CACHE/conv_impls.json` (default `~/.cache/agejax`) keyed by backend, device kind and signature, so
a second run measures nothing. A signature missing from the plan falls back to 'canonical'.
A study also writes the plan it used into its workdir (`conv_plan.json`) and follows that file when it
runs there again, so timings measured afresh never change a rerun's numbers.

All implementations compute the same convolution (tests compare values and gradients), so the plan only
changes speed, never results beyond float rounding.
"""

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

log = logging.getLogger(__name__)

IMPLS = ("lax", "canonical", "patches")
FALLBACK = "canonical"
Signature = tuple  # (x_shape, kernel_shape, strides, pads, groups, dtype)

_plan: dict[Signature, str] = {}
_recorder: list[Signature] | None = None


def signature(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
              pads: Sequence[tuple[int, int]], groups: int, dtype: Any) -> Signature:
  return (tuple(x_shape), tuple(kernel_shape), tuple(strides), tuple(tuple(p) for p in pads), int(groups),
          jnp.dtype(dtype).name)


def resolve(sig: Signature) -> str:
  """The implementation an 'auto' convolution uses (and records the signature while recording)."""
  if _recorder is not None:
    _recorder.append(sig)
  return _plan.get(sig, FALLBACK)


@contextlib.contextmanager
def recording() -> Iterator[list[Signature]]:
  """Collects the signatures of the 'auto' convolutions traced inside the block."""
  global _recorder
  previous, _recorder = _recorder, []
  try:
    yield _recorder
  finally:
    _recorder = previous


def set_plan(plan: dict[Signature, str]) -> None:
  """Adds choices to the active plan (signature -> implementation)."""
  bad = {v for v in plan.values() if v not in IMPLS}
  if bad:
    raise ValueError(f"unknown convolution implementations {sorted(bad)}; expected {IMPLS}")
  _plan.update(plan)


def current_plan() -> dict[Signature, str]:
  return dict(_plan)


def _cache_path() -> str:
  root = os.environ.get("AGEJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "agejax"))
  return os.path.join(root, "conv_impls.json")


def _device_key() -> str:
  return f"{jax.default_backend()}|{jax.devices()[0].device_kind}"


def _cache_key(sig: Signature) -> str:
  return f"{_device_key()}|{json.dumps(sig)}"


def time_impl(sig: Signature, impl: str, repeats: int = 3) -> float:
  """Best seconds of two forward+backward passes of one convolution inside a `lax.scan`."""
  from agejax.models.layers import conv_nhwc

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
  path = _cache_path()
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, json.JSONDecodeError):
    cache = {}
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
    _write_json(path, cache)
  return plan


def _write_json(path: str, obj: Any) -> None:
  """Writes `obj` to `path` atomically (readers never see half a file)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def model_signatures(model: Any, variables: Any, x_shape: Sequence[int], dtype: Any = jnp.float32) -> list[Signature]:
  """Signatures of the 'auto' convolutions in one training-mode forward pass (shapes only)."""
  x = jax.ShapeDtypeStruct(tuple(x_shape), dtype)
  with recording() as sigs:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                            mutable=["batch_stats"]), variables, x)
  return list(dict.fromkeys(sigs))


def read_plan_file(path: str) -> dict[Signature, str]:
  """A plan written by `write_plan_file` ({} when the file does not exist)."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      raw = json.load(f)
    plan = {_signature_from_json(key): impl for key, impl in raw["plan"].items()}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a convolution plan written by agejax ({e})") from e
  bad = {v for v in plan.values() if v not in IMPLS}
  if bad:
    raise ValueError(f"{path}: unknown convolution implementations {sorted(bad)}; expected {IMPLS}")
  return plan


def write_plan_file(path: str, plan: dict[Signature, str]) -> None:
  """Merges `plan` into the plan file at `path` (atomically)."""
  merged = {**read_plan_file(path), **plan}
  _write_json(path, {"device": _device_key(), "plan": {json.dumps(sig): impl for sig, impl in merged.items()}})


def _signature_from_json(key: str) -> Signature:
  x_shape, k_shape, strides, pads, groups, dtype = json.loads(key)
  return signature(x_shape, k_shape, strides, pads, groups, dtype)


def plan_model(model: Any, variables: Any, x_shape: Sequence[int], impls: Sequence[str] = IMPLS,
               plan_file: str | None = None, measure: bool = True) -> dict[Signature, str]:
  """The plan for every convolution of `model`, in trace order: measured or read from the cache.

  With `plan_file`, choices already in that file are used as they are (so a run repeats an earlier run's
  numbers exactly, whatever the timings say today) and the plan is merged back into it. With `measure=False`
  nothing is timed, cached or written, and convolutions missing from the file get the fallback."""
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


def tune_model(model: Any, variables: Any, x_shape: Sequence[int], impls: Sequence[str] = IMPLS,
               plan_file: str | None = None, measure: bool = True) -> dict[str, int]:
  """`plan_model`, made the active plan; returns counts per choice."""
  plan = plan_model(model, variables, x_shape, impls, plan_file, measure)
  set_plan(plan)
  return counts_of(plan)
