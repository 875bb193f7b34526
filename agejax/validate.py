"""Checks a study config before anything runs or is written: the first problem is one ConfigError naming the field.

The allowed names come from the modules that use them (trial strategies, convolution implementations, head
kinds, architectures, data sources, resize modes, bad-input policies, pre-training stop rules, transfer modes);
where a module checks a value inline, its own check is run on the value. Nothing here imports a device backend.
"""

import os
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any, get_args

from agejax.errors import ConfigError

# The studies a config can name (`config.study`) and the modules whose `run(config, workdir)` runs them.
STUDIES = {
    "learning_curve": "agejax.experiments.learning_curve",
    "transfer": "agejax.experiments.transfer",
}


def validate_config(config: Any) -> None:
  """Raises ConfigError (one line, naming the field) for the first invalid field of a study config.

  Every field checked must be set: the config files start from agejax.configs.base_config or transfer_config,
  which declare every field with its default."""
  study = _field(config, "study", "config")
  _choice(study, tuple(STUDIES), "config.study")
  _int(_field(config, "seed", "config"), "config.seed")
  _data(_field(config, "data", "config"), "config.data")
  _model_head(_field(config, "model", "config"), "config.model")
  _optim(_field(config, "optim", "config"), "config.optim")
  _int(_field(config, "batch_size", "config"), "config.batch_size", low=1)
  _int(_field(config, "eval_batch_size", "config"), "config.eval_batch_size", low=1)
  if study == "transfer":
    _transfer(config)
  else:
    _learning_curve(config)


# -- values ------------------------------------------------------------------------------------------------
def _field(section: Any, key: str, where: str) -> Any:
  """`section[key]`; a ConfigError naming `where.key` when the section does not declare it."""
  if key not in section:
    raise ConfigError(f"{where}.{key} is not set (a config starts from agejax.configs.base_config or "
                      "transfer_config, which declare every field)")
  return section[key]


def _choice(value: Any, allowed: Sequence[str], field: str) -> None:
  if value not in allowed:
    raise ConfigError(f"{field}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _int(value: Any, field: str, low: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, Integral):
    raise ConfigError(f"{field}={value!r} must be an integer")
  if value < low:
    raise ConfigError(f"{field}={value} must be at least {low}")
  return int(value)


def _real(value: Any, field: str, low: float = 0.0, positive: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, Real):
    raise ConfigError(f"{field}={value!r} must be a number")
  if value < low or (positive and value <= low):
    raise ConfigError(f"{field}={value} must be {'above' if positive else 'at least'} {low:g}")
  return float(value)


def _fraction(value: Any, field: str) -> None:
  if _real(value, field) >= 1:
    raise ConfigError(f"{field}={value:g} must be below 1")


def _existing(path: Any, field: str, what: str = "path") -> None:
  if not isinstance(path, str):
    raise ConfigError(f"{field}={path!r} must be a {what} (a string)")
  if not os.path.exists(path):
    raise ConfigError(f"{field}={path!r} does not exist")


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
  if not isinstance(value, Mapping) and not hasattr(value, "items"):
    raise ConfigError(f"{field} must be a dict of fields, got {value!r}")
  return value


def _rows(value: Any, field: str) -> Sequence[Any]:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise ConfigError(f"{field} must be a list, got {value!r}")
  return value


# -- sections ----------------------------------------------------------------------------------------------
def _data(data: Mapping[str, Any], field: str) -> None:
  from agejax.data.images import RESIZE_MODES
  from agejax.data.records import Policy
  from agejax.experiments.study_data import SOURCES

  data = _mapping(data, field)
  name = _field(data, "name", field)
  _choice(name, SOURCES, f"{field}.name")
  _choice(_field(data, "policy", field), get_args(Policy), f"{field}.policy")
  _choice(_field(data, "resize_mode", field), RESIZE_MODES, f"{field}.resize_mode")
  resize = _int(_field(data, "resize", field), f"{field}.resize", low=1)
  if _int(_field(data, "crop", field), f"{field}.crop", low=1) > resize:
    raise ConfigError(f"{field}.crop={data['crop']} is larger than {field}.resize={resize}")
  for key in ("test_size", "pool_limit", "max_records"):
    _int(_field(data, key, field), f"{field}.{key}")
  for key in ("test_fraction", "pool_fraction"):
    _fraction(_field(data, key, field), f"{field}.{key}")
  if "val_fraction" in data:  # the transfer study's pool split (transfer_config)
    _fraction(data["val_fraction"], f"{field}.val_fraction")
  for key in ("val_size", "train_size"):
    if key in data:
      _int(data[key], f"{field}.{key}")
  if name != "synthetic":
    root = _field(data, "root", field)
    if not root:
      raise ConfigError(f"{field}.root is not set: point it at the {name} dataset folder "
                        f"(--{field}.root=/path/to/dataset)")
    _existing(root, f"{field}.root")


def _model_head(model: Mapping[str, Any], field: str) -> None:
  from agejax.models.heads import HeadKind

  _choice(_field(_mapping(model, field), "head", field), get_args(HeadKind), f"{field}.head")


def _model_spec(spec: Any, field: str) -> None:
  from agejax.models.heads import HeadKind
  from agejax.models.registry import BACKBONES

  spec = _mapping(spec, field)
  _choice(spec.get("arch"), tuple(sorted(BACKBONES)), f"{field}.arch")
  if "head" in spec:
    _choice(spec["head"], get_args(HeadKind), f"{field}.head")


def _optim(optim: Mapping[str, Any], field: str) -> None:
  import ml_collections

  from agejax.engine.optim import make_optimizer

  optim = _mapping(optim, field)
  if "base_lr" not in optim:
    raise ConfigError(f"{field}.base_lr is not set")
  _real(optim["base_lr"], f"{field}.base_lr")
  try:  # the optimiser's own check of its name and fields, on no parameters
    make_optimizer(ml_collections.ConfigDict(dict(optim)), {})
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError(f"{field}: {e}") from None


def _sizes(sizes: Any, field: str = "config.sizes", size_zero: bool = True) -> None:
  """Rows (n, trials, stepsize, max_iter): n images (or a fraction <= 1 of the pool), trials >= 1; none at all
  evaluates the priors untouched (size 0) only."""
  shape = "(n, trials, stepsize, max_iter) rows, e.g. --config.sizes='((3, 4, 4, 6), (6, 4, 4, 6))'"
  if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
    raise ConfigError(f"{field}={sizes!r} must be a list of {shape}")
  if not sizes and not size_zero:
    raise ConfigError(f"{field}=() with config.eval_size_zero=False: nothing to run; give {shape}")
  for i, row in enumerate(sizes):
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != 4:
      raise ConfigError(f"{field}[{i}]={row!r} is not one of the {shape}")
    n, trials, stepsize, max_iter = row
    if isinstance(n, float):
      _real(n, f"{field}[{i}] n (a fraction of the pool)", positive=True)
    else:
      _int(n, f"{field}[{i}] n")
    _int(trials, f"{field}[{i}] trials", low=1)
    _real(stepsize, f"{field}[{i}] stepsize", positive=True)
    _real(max_iter, f"{field}[{i}] max_iter")


class _Accepted(Exception):
  """Raised by a stand-in once a module's own check has passed and it reaches for the real object."""


class _CheckedPrior:
  """Stands in for a Prior: `with_engine_backbone` validates its settings before it reads `spec`."""

  @property
  def spec(self) -> Any:
    raise _Accepted


def _passes(check: Callable[[], Any]) -> None:
  try:
    check()
  except _Accepted:
    return


def _trials(trials: Mapping[str, Any], field: str = "config.trials") -> None:
  from agejax.engine.trials import STRATEGIES
  from agejax.experiments.engines import with_engine_backbone

  trials = _mapping(trials, field)
  get = lambda key: _field(trials, key, field)  # noqa: E731
  _choice(get("parallel"), ("auto", *STRATEGIES), f"{field}.parallel")
  for i, name in enumerate(_rows(get("auto_candidates"), f"{field}.auto_candidates")):
    _choice(name, STRATEGIES, f"{field}.auto_candidates[{i}]")
  # conv_impl and compute_dtype: the engine's own check (it raises ConfigError naming the field).
  conv_impl, compute_dtype = get("conv_impl"), get("compute_dtype")
  _passes(lambda: with_engine_backbone(_CheckedPrior(), conv_impl, compute_dtype))
  _int(get("chunk_steps"), f"{field}.chunk_steps", low=1)
  _int(get("trial_chunk"), f"{field}.trial_chunk")
  _real(get("memory_budget_gb"), f"{field}.memory_budget_gb")
  if get("conv_plan"):
    _existing(trials["conv_plan"], f"{field}.conv_plan", "conv_plan.json file")


def _prior_sections(entry: Mapping[str, Any], optim: Mapping[str, Any], where: str) -> None:
  """A prior's own solver, data view, freeze and head kind (learning_curve.prior_config, priors.head_spec)."""
  from agejax.experiments.learning_curve import OPTIM_FIELDS
  from agejax.experiments.study_data import check_view
  from agejax.models.heads import AGE_KINDS

  if entry.get("optim"):
    own = _mapping(entry["optim"], f"{where}.optim")
    unknown = sorted(set(own) - set(OPTIM_FIELDS))
    if unknown:
      raise ConfigError(f"{where}.optim.{unknown[0]} is not a solver field; expected one of {', '.join(OPTIM_FIELDS)}")
    _optim({**dict(optim), **dict(own)}, f"{where}.optim")
  if entry.get("data"):
    check_view(_mapping(entry["data"], f"{where}.data"), f"{where}.data")
  if "freeze" in entry and (not isinstance(entry["freeze"], str) or not entry["freeze"]):
    raise ConfigError(f"{where}.freeze={entry['freeze']!r}; expected 'none', 'backbone' or a stage name")
  if entry.get("head_type") and entry["head_type"] not in AGE_KINDS:
    raise ConfigError(f"{where}.head_type={entry['head_type']!r}; expected one of {', '.join(AGE_KINDS)}")


def _priors(priors: Any, data: Mapping[str, Any], field: str = "config.priors",
            optim: Mapping[str, Any] | None = None) -> None:
  from agejax.experiments.pretrain import STOP_RULES

  priors = _rows(priors, field)
  if not priors:
    raise ConfigError(f"{field} is empty: add at least one prior (a prior directory or a model spec)")
  seen = set()
  for i, entry in enumerate(priors):
    where = f"{field}[{i}]"
    entry = _mapping(entry, where)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
      raise ConfigError(f"{where}.name must be a non-empty string, got {name!r}")
    if name in seen:
      raise ConfigError(f"{where}.name={name!r} is used by two priors; names must be unique")
    seen.add(name)
    where = f"{field}[{name}]"  # as the study's own messages name a prior
    if entry.get("dir"):
      _existing(entry["dir"], f"{where}.dir", "prior directory")
    elif entry.get("model"):
      _model_spec(entry["model"], f"{where}.model")
    else:
      raise ConfigError(f"{where} needs `dir` (a prior directory) or `model` (a spec to start from scratch)")
    _prior_sections(entry, optim or {}, where)
    stage = entry.get("pretrain")
    if stage:
      stage = _mapping(stage, f"{where}.pretrain")
      _choice(stage.get("stop", "fixed"), STOP_RULES, f"{where}.pretrain.stop")
      if stage.get("data"):  # the stage's data section is laid over config.data
        _data({**dict(data), **dict(_mapping(stage["data"], f"{where}.pretrain.data"))}, f"{where}.pretrain.data")
      if stage.get("optim"):
        _optim(stage["optim"], f"{where}.pretrain.optim")


def _learning_curve(config: Any) -> None:
  get = lambda key: _field(config, key, "config")  # noqa: E731
  _sizes(get("sizes"), size_zero=bool(get("eval_size_zero")))
  _real(get("steps_scale"), "config.steps_scale", positive=True)
  _int(get("min_steps"), "config.min_steps")
  _real(get("keep_states_mb"), "config.keep_states_mb")
  _trials(get("trials"))
  mesh = _mapping(get("mesh"), "config.mesh")
  for key, low in (("trial", 0), ("data", 1), ("cpu_devices", 0)):
    _int(_field(mesh, key, "config.mesh"), f"config.mesh.{key}", low=low)
  ckpt = _mapping(get("checkpoint"), "config.checkpoint")
  for key in ("every_chunks", "keep"):
    _int(_field(ckpt, key, "config.checkpoint"), f"config.checkpoint.{key}", low=1)
  _priors(get("priors"), get("data"), optim=get("optim"))


def _transfer(config: Any) -> None:
  from agejax.experiments.transfer import _check_backbones

  _check_backbones(config)  # the study's own check: backbone entries and modes
  _int(_field(config, "epochs", "config"), "config.epochs", low=1)
