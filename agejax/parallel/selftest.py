"""Checks a (multi-process) launch end to end: `python -m agejax.parallel.selftest [--out FILE] [--data D]`.

Each process loads only its block of a known (trial, batch) array, the blocks form one global array on a
(trial, data) mesh over all devices, and a jitted computation returns per-trial sums (replicated), their total
(a cross-process reduction) and trial-sharded sums. Prints one JSON line per process; exits 1 on a wrong result.
"""

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax.parallel.distributed import maybe_initialize, process_info
from agejax.parallel.mesh import (
    batch_sharding,
    global_batch_from_local,
    make_mesh,
    process_slices,
    replicated,
    trial_sharding,
)


def run(data: int = 1, trials_per_device: int = 2, batch_per_device: int = 3) -> dict[str, Any]:
  """Runs the check and returns what it saw; `ok` says whether every result matched numpy."""
  initialized = maybe_initialize()
  mesh = make_mesh(trial=-1, data=data)
  n_trials, batch = mesh.shape["trial"] * trials_per_device, mesh.shape["data"] * batch_per_device
  full = (np.arange(n_trials)[:, None] * 1000 + np.arange(batch)[None, :]).astype(np.float32)
  sharding = batch_sharding(mesh)
  block = process_slices(sharding, full.shape)
  x = global_batch_from_local(full[block], mesh, sharding.spec, full.shape)

  def sums_and_total(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    sums = jnp.sum(x, axis=1)
    return sums, jnp.sum(sums), sums  # the last copy stays trial-sharded

  out_shardings = (replicated(mesh), replicated(mesh), trial_sharding(mesh))
  step = jax.jit(sums_and_total, in_shardings=sharding, out_shardings=out_shardings)
  sums, total, sharded = step(x)
  want = full.sum(axis=1)
  local_ok = all(np.allclose(np.asarray(s.data), want[s.index]) for s in sharded.addressable_shards)
  sums, total = np.asarray(sums), float(total)
  info = process_info()
  return dict(
      **info,
      distributed=initialized,
      reinitialized=maybe_initialize(),
      mesh_shape=dict(mesh.shape),
      local_block=[[s.start, s.stop] for s in block],
      n_trials=n_trials,
      per_trial_sums=sums.tolist(),
      total=total,
      expected_total=float(want.sum()),
      ok=bool(np.allclose(sums, want) and total == float(want.sum()) and local_ok),
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="also write the JSON here ('{process}' is replaced by the process index)")
  parser.add_argument("--data", type=int, default=1, help="size of the mesh's 'data' axis")
  args = parser.parse_args(argv)
  result = run(data=args.data)
  text = json.dumps(result, sort_keys=True)
  print(text, flush=True)
  if args.out:
    with open(args.out.replace("{process}", str(result["process_index"])), "w") as f:
      f.write(text + "\n")
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
