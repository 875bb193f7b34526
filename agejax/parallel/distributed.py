"""Multi-process start-up: `jax.distributed.initialize` driven by the environment the launch scripts set.

Environment (read by `maybe_initialize`, first match wins):
  AGEJAX_COORDINATOR, AGEJAX_NUM_PROCESSES, AGEJAX_PROCESS_ID
      explicit host:port, process count and this process's index (launch/local.sh, launch/slurm.sbatch);
      AGEJAX_LOCAL_DEVICE_IDS (optional, e.g. "0,1") restricts the accelerators this process uses.
  AGEJAX_DISTRIBUTED=auto
      `jax.distributed.initialize()` with no arguments: JAX detects TPU pods, Slurm and Open MPI itself.
  AGEJAX_CPU_DEVICES=K
      K fake CPU devices per process (`jax_num_cpu_devices`), with or without the above.
Nothing set means a single process: nothing is initialized.
"""

import os
from typing import Any

import jax
from jax._src import xla_bridge  # no public way to ask whether a backend already exists

from agejax.errors import ConfigError

_ENV_KEYS = ("AGEJAX_COORDINATOR", "AGEJAX_NUM_PROCESSES", "AGEJAX_PROCESS_ID")


def _env_int(name: str) -> int:
  value = os.environ[name]
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} is not an integer") from None


def _may_use_cpu() -> bool:
  """True unless the platforms were restricted to ones without the CPU (e.g. JAX_PLATFORMS=cuda)."""
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  return not platforms or "cpu" in platforms.split(",")


def _configure_cpu() -> None:
  """Sets CPU options; they must precede the first backend use, so only touch them while that is possible."""
  if xla_bridge.backends_are_initialized():
    return
  if "AGEJAX_CPU_DEVICES" in os.environ:
    jax.config.update("jax_num_cpu_devices", _env_int("AGEJAX_CPU_DEVICES"))
  if _may_use_cpu():
    # Without a CPU collectives implementation, cross-process computations on CPU fail at run time.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _init_kwargs() -> dict[str, Any] | None:
  """Arguments for `jax.distributed.initialize` from the environment, or None for a single process."""
  present = [k for k in _ENV_KEYS if os.environ.get(k)]
  if present:
    missing = [k for k in _ENV_KEYS if k not in present]
    if missing:
      raise ConfigError(f"{', '.join(present)} set but {', '.join(missing)} missing: set all three or none")
    kwargs: dict[str, Any] = dict(
        coordinator_address=os.environ["AGEJAX_COORDINATOR"],
        num_processes=_env_int("AGEJAX_NUM_PROCESSES"),
        process_id=_env_int("AGEJAX_PROCESS_ID"),
    )
    if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
      raise ConfigError(f"AGEJAX_PROCESS_ID={kwargs['process_id']} outside [0, {kwargs['num_processes']})")
    if os.environ.get("AGEJAX_LOCAL_DEVICE_IDS"):
      ids = os.environ["AGEJAX_LOCAL_DEVICE_IDS"]
      try:
        kwargs["local_device_ids"] = [int(i) for i in ids.split(",")]
      except ValueError:
        raise ConfigError(f"AGEJAX_LOCAL_DEVICE_IDS={ids!r} is not a comma-separated list of integers") from None
    return kwargs
  mode = os.environ.get("AGEJAX_DISTRIBUTED", "").lower()
  if mode == "auto":
    return {}
  if mode not in ("", "0", "off", "false", "no"):
    raise ConfigError(f"AGEJAX_DISTRIBUTED={mode!r}: expected 'auto' or unset")
  return None


def maybe_initialize() -> bool:
  """Initializes JAX's multi-process runtime when the launch environment asks for it (idempotent).

  Returns whether the distributed runtime is active after the call. Call it before any other JAX use.
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = _init_kwargs()
  if kwargs is not None and xla_bridge.backends_are_initialized():
    raise RuntimeError("maybe_initialize() must run before any JAX computation or jax.devices() call")
  _configure_cpu()
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """True in the process that writes logs, checkpoints and reports (process 0)."""
  return jax.process_index() == 0


def process_info() -> dict[str, Any]:
  """Where this process sits: index/count, local and global device counts, platform."""
  return dict(
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      local_device_count=jax.local_device_count(),
      device_count=jax.device_count(),
      platform=jax.default_backend(),
      device_kind=jax.local_devices()[0].device_kind,
  )
