"""Multi-process runtime (distributed.py), the (trial, data) mesh and shardings (mesh.py), and a self-test."""

from agejax.parallel.distributed import is_main_process, maybe_initialize, process_info
from agejax.parallel.mesh import (
    batch_sharding,
    global_batch_from_local,
    make_mesh,
    pad_trials,
    process_slices,
    replicated,
    shard_tree,
    trial_sharding,
)

__all__ = [
    "batch_sharding",
    "global_batch_from_local",
    "is_main_process",
    "make_mesh",
    "maybe_initialize",
    "pad_trials",
    "process_info",
    "process_slices",
    "replicated",
    "shard_tree",
    "trial_sharding",
]
