"""Runs a study from a config file.

  python -m agejax.main --config configs/demo.py --workdir /tmp/agejax_demo
  python -m agejax.main --config configs/utkface.py:runlocal --workdir /tmp/utk --config.seed=1

Exit status: 0 done, 1 a clear error (logged), 75 stopped by SIGTERM after a checkpoint (rerun to continue).
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from agejax.errors import AgejaxError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARGS]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, logs and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])

STUDIES = {
    "learning_curve": "agejax.experiments.learning_curve",
    "transfer": "agejax.experiments.transfer",
}


def run_config(config, workdir: str):
  """Runs the study a config names; importable from tests and notebooks."""
  import importlib

  study = config.get("study", "learning_curve")
  if study not in STUDIES:
    raise AgejaxError(f"unknown config.study {study!r}; known: {', '.join(sorted(STUDIES))}")
  return importlib.import_module(STUDIES[study]).run(config, workdir)


def enable_compilation_cache() -> None:
  """Persists compiled XLA programs (`$AGEJAX_CACHE/xla`), so a rerun does not compile again.

  Programs that compiled faster than `$AGEJAX_CACHE_MIN_COMPILE_S` seconds (default 1) are not kept."""
  import jax

  root = os.environ.get("AGEJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "agejax"))
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get("AGEJAX_CACHE_MIN_COMPILE_S", "1.0")))


def initialize(config) -> None:
  """Before any other JAX use: the multi-process runtime and the CPU device count (`config.mesh.cpu_devices`),
  then the compilation cache."""
  from agejax.parallel.distributed import maybe_initialize

  maybe_initialize(int((config.get("mesh") or {}).get("cpu_devices", 0)))
  enable_compilation_cache()


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax", "absl.logging"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  initialize(_CONFIG.value)
  import jax

  from agejax.engine.checkpoint import EXIT_PREEMPTED, Preempted, StopOnSignal

  if jax.process_index() != 0:  # process 0 logs; the others only warn
    logging.getLogger().setLevel(logging.WARNING)
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    with StopOnSignal():  # SIGTERM: checkpoint at the next chunk boundary, then exit EXIT_PREEMPTED
      run_config(_CONFIG.value, workdir)
  except Preempted as e:
    logging.warning("%s", e)
    raise SystemExit(EXIT_PREEMPTED) from e
  except AgejaxError as e:
    logging.error("%s: %s", type(e).__name__, e)
    raise SystemExit(1) from e
  logging.info("done: results in %s", workdir)


if __name__ == "__main__":
  app.run(main)
