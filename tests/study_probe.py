"""Runs a study like `python -m agejax.main` does, in this process, and prints what the engine did.

  python tests/study_probe.py --config configs/demo.py:quick,tiny --workdir W [--config.FIELD=VALUE ...]

Used by the scale-out tests (set AGEJAX_CPU_DEVICES and the launch variables in the environment). Process 0
prints one line `PROBE {json}`: the trace counts of every runner, and how a freshly formed first group of
each size is laid out (shape, sharding, devices, rows per shard).
"""

import json

import jax
from absl import app

from agejax import main as cli  # defines --config and --workdir


def main(argv: list[str]) -> None:
  del argv
  cli.initialize(cli._CONFIG.value)
  from agejax.experiments import learning_curve, plan
  from agejax.experiments.study_data import load_study_data
  from agejax.parallel.sharding import MeshConfig

  cfg = cli._CONFIG.value
  engines = {}
  learning_curve.run(cfg, cli._WORKDIR.value, engines=engines)
  out = {"devices": jax.device_count(), "processes": jax.process_count(), "traces": {}, "groups": {}}
  data = load_study_data(cfg.data, cfg.seed)
  sizes = plan.size_schedule(cfg.sizes, data.num_bases, cfg.steps_scale, cfg.min_steps)
  chunk_steps = plan.study_chunk_steps(sizes, cfg.trials.chunk_steps)
  for engine in engines.values():
    for runner in engine.runners.values():
      out["traces"].update({f"{s},{g}": c for (s, g), c in runner.trace_counts.items()})
    runner = engine.runner(cfg.trials.parallel)
    for size in sizes:
      layout = runner.layout(MeshConfig.from_config(cfg), size.trials)
      first = layout.slices[0]
      group = runner.group([engine.initial_state(s) for s in range(first.start, first.stop)], layout)
      leaf = jax.tree.leaves(group.params)[0]
      out["groups"][str(size.trials)] = {"shape": list(leaf.shape), "sharding": type(leaf.sharding).__name__,
                                            "spec": str(getattr(leaf.sharding, "spec", "")),
                                            "devices": len(leaf.sharding.device_set),
                                            "shard_rows": sorted({s.data.shape[0] for s in leaf.addressable_shards})}
      out["data_allreduce"] = data_allreduce(runner, group, data, cfg, chunk_steps)
  if jax.process_index() == 0:
    print("PROBE " + json.dumps(out), flush=True)


def data_allreduce(runner, group, data, cfg, steps: int) -> int | None:
  """All-reduce ops in the compiled chunk program of a group on a mesh with a 'data' axis (None without)."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from agejax.engine.trials import Hyper
  from agejax.parallel import sharding as sharding_lib

  mesh = sharding_lib.mesh_of(group)
  if mesh is None or mesh.shape["data"] == 1:
    return None
  train, _ = runner._mesh_programs(mesh)
  rep = NamedSharding(mesh, P())
  rows = jax.tree.leaves(group)[0].shape[0]
  idx = np.zeros((rows, steps, cfg.batch_size), np.int32)
  idx = sharding_lib.to_global(idx, NamedSharding(mesh, sharding_lib.index_spec(mesh, cfg.batch_size)))
  scalars = [sharding_lib.to_global(np.int32(v), rep) for v in (0, 1, 1)]
  pool = [runner._replicated(jnp.asarray(x), mesh) for x in (data.pool_images, data.pool_ages)]
  text = train.lower(group, scalars[0], Hyper(*scalars[1:]), idx, *pool).compile().as_text()
  return text.count(" all-reduce(")


if __name__ == "__main__":
  app.run(main)
