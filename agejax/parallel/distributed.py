"""Multi-process start-up: `jax.distributed.initialize` driven by the environment the launch scripts set.

Environment (read by `maybe_initialize`, first match wins):
  AGEJAX_COORDINATOR, AGEJAX_NUM_PROCESSES, AGEJAX_PROCESS_ID
      explicit host:port, process count and this process's index (launch/local.sh, launch/slurm.sbatch);
      AGEJAX_LOCAL_DEVICE_IDS (optional, e.g. "0,1") restricts the accelerators this process uses.
  AGEJAX_DISTRIBUTED=auto
      `jax.distributed.initialize()` with no arguments: JAX detects TPU pods, Slurm and Open MPI itself.
  AGEJAX_CPU_DEVICES=K
      K CPU devices per process (`jax_num_cpu_devices`), with or without the above.
Nothing set means a single process: nothing is initialized.

CPU devices: independent trials train concurrently, one block per device, and on a CPU several devices
(one per core) beat one device whose small convolutions are split over all cores (`docs/benchmarks.md`).
So unless AGEJAX_CPU_DEVICES or XLA_FLAGS' `--xla_force_host_platform_device_count` says otherwise, the
process gets `cpu_devices` CPU devices (the config's `mesh.cpu_devices`; 0 = one per usable core, at most
`MAX_AUTO_CPU_DEVICES`). Accelerator backends are unaffected.
"""

import os
from typing import Any

import jax
from jax._src import xla_bridge  # no public way to ask whether a backend already exists

from agejax.errors import ConfigError

_ENV_KEYS = ("AGEJAX_COORDINATOR", "AGEJAX_NUM_PROCESSES", "AGEJAX_PROCESS_ID")
MAX_AUTO_CPU_DEVICES = 8  # every CPU device holds its own copy of the image pool


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


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on every OS
    return os.cpu_count() or 1


def cpu_device_count(cpu_devices: int = 0) -> int | None:
  """CPU devices to create: AGEJAX_CPU_DEVICES (if not empty), else None if XLA_FLAGS already sets a count, else
  `cpu_devices`, else one per usable core (at most `MAX_AUTO_CPU_DEVICES`)."""
  if os.environ.get("AGEJAX_CPU_DEVICES"):
    n = _env_int("AGEJAX_CPU_DEVICES")
  elif "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  else:
    n = cpu_devices or min(usable_cores(), MAX_AUTO_CPU_DEVICES)
  if n < 1:
    raise ConfigError(f"CPU device count must be positive, got {n} (AGEJAX_CPU_DEVICES or mesh.cpu_devices)")
  return n


def _configure_cpu(cpu_devices: int) -> None:
  """Sets CPU options; they must precede the first backend use, so only touch them while that is possible."""
  if xla_bridge.backends_are_initialized():
    return
  n = cpu_device_count(cpu_devices)
  if n is not None:
    jax.config.update("jax_num_cpu_devices", n)
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


def maybe_initialize(cpu_devices: int = 0) -> bool:
  """Initializes JAX's multi-process runtime when the launch environment asks for it (idempotent), and sets
  the CPU device count (`cpu_device_count`) while the backend does not exist yet.

  Returns whether the distributed runtime is active after the call. Call it before any other JAX use.
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = _init_kwargs()
  if kwargs is not None and xla_bridge.backends_are_initialized():
    raise RuntimeError("maybe_initialize() must run before any JAX computation or jax.devices() call")
  _configure_cpu(cpu_devices)
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
