"""Runs a study from a config file.

  python -m agejax.main --config configs/demo.py --workdir /tmp/agejax_demo
  python -m agejax.main --config configs/utkface.py:runlocal --workdir /tmp/utk --config.seed=1

Any config field is overridable with --config.FIELD=VALUE. The command line and the config are checked before
anything is written (agejax.validate): a bad flag, an unknown field, a missing config file or an invalid value
is one line naming it (--debug shows the traceback).

Exit status: 0 done, 1 a clear error (one line), 75 stopped by SIGTERM after a checkpoint (rerun to continue).
"""

import difflib
import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from agejax.errors import AgejaxError, ConfigError
from agejax.validate import STUDIES, validate_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARGS]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, logs and checkpoints.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of an error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])

_HELP = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def run_config(config, workdir: str):
  """Runs the study a config names; importable from tests and notebooks."""
  import importlib

  study = config.study
  if study not in STUDIES:
    raise AgejaxError(f"unknown config.study {study!r}; known: {', '.join(sorted(STUDIES))}")
  return importlib.import_module(STUDIES[study]).run(config, workdir)


def enable_compilation_cache() -> None:
  """Persists compiled XLA programs (`$AGEJAX_CACHE/xla`), so a rerun does not compile again.

  Programs that compiled faster than `$AGEJAX_CACHE_MIN_COMPILE_S` seconds (default 1) are not kept."""
  import jax

  from agejax.cachedir import cache_path

  jax.config.update("jax_compilation_cache_dir", cache_path("xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get("AGEJAX_CACHE_MIN_COMPILE_S", "1.0")))


def initialize(config) -> None:
  """Before any other JAX use: the multi-process runtime and the CPU device count (`config.mesh.cpu_devices`),
  then the compilation cache."""
  from agejax.parallel.distributed import maybe_initialize

  maybe_initialize(int(config.mesh.cpu_devices))
  enable_compilation_cache()


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V or --name V in argv (the last one given), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _override_fields(argv: list[str]) -> list[str]:
  """The FIELD of every --config.FIELD[=V] (and --noconfig.FIELD) in argv."""
  out = []
  for arg in argv:
    body = arg.lstrip("-")
    if arg.startswith("-") and (body.startswith("config.") or body.startswith("noconfig.")):
      out.append(body.split("=", 1)[0].split(".", 1)[1])
  return out


def _unknown_field(config_arg: str, fields: list[str]) -> str | None:
  """'--config.a.b: config.a has no field 'b' (did you mean ...?)' for the first override that names no field."""
  import importlib.util

  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("agejax_config_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for field in fields:
    node, path = config, "config"
    for part in field.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else None
      if keys is None:
        return f"--config.{field}: {path} is a value of type {type(node).__name__}, it has no field {part!r}"
      if part not in keys:
        close = difflib.get_close_matches(part, [str(k) for k in keys], n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"its fields: {', '.join(map(str, keys))}"
        return f"--config.{field}: {path} has no field {part!r} ({hint})"
      node, path = node[part], f"{path}.{part}"
  return None


def _one_line(e: BaseException, argv: list[str]) -> str:
  """A command-line or config-file error as one line naming the flag, field or file."""
  config_arg = _flag_value(argv, "config")
  if not isinstance(e, (flags.Error, AgejaxError)) and config_arg:
    try:
      unknown = _unknown_field(config_arg, _override_fields(argv))
    except Exception:  # noqa: BLE001 - the config itself is broken; describe the original error
      unknown = None
    if unknown:
      return unknown
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  if "Error whilst parsing config file" in str(e):  # ml_collections wraps get_config's error in its traceback
    return f"--config={config_arg}: {lines[-1]}"
  text = lines[0] if lines else type(e).__name__
  return text if isinstance(e, (flags.Error, AgejaxError)) else f"{type(e).__name__}: {text}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with help on stdout (exit 0) and every error as one line on stderr (exit 1)."""
  if any(arg in _HELP for arg in argv[1:]):
    print(__doc__.strip())
    print("\nflags:\n" + flags.FLAGS.module_help(flags.FLAGS.find_module_defining_flag("workdir")))
    sys.exit(0)
  try:
    config_arg = _flag_value(argv, "config")
    if config_arg is not None and not os.path.isfile(config_arg.split(":", 1)[0]):
      raise ConfigError(f"--config={config_arg}: config file {config_arg.split(':', 1)[0]!r} does not exist")
    return flags.FLAGS(argv)
  except Exception as e:
    if "--debug" in argv:
      raise
    print(f"error: {_one_line(e, argv)}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax", "absl.logging"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:  # before anything is written or started
    validate_config(_CONFIG.value)
  except ConfigError as e:
    if _DEBUG.value:
      raise
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None
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
    if _DEBUG.value:
      logging.error("%s", traceback.format_exc())
    logging.error("%s: %s", type(e).__name__, e)
    raise SystemExit(1) from e
  logging.info("done: results in %s", workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
