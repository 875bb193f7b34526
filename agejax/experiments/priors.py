"""Priors: the initialisation a learning curve starts from, resolved from a config entry.

A prior entry (`config.priors[i]`) has:
  name    label in tables and plots;
  dir     an agejax prior directory (from `agejax.port` or a pre-training stage), or
  model   a model spec to initialise from scratch (tests, the demo);
  head    'keep' (the checkpoint's own age head) or 'new' (a fresh head, initialised per trial from the
          trial's seed);
  head_type     the head kind (agejax.models.heads: dex, dldl, dldl_v2, mean_variance, sord, coral, corn,
          regression); default `config.model.head` for a new head, the checkpoint's own for a kept one. A kept
          softmax head (K logits: dex, dldl, ...) can switch to another softmax kind: the same K logits, bins
          and weights, trained by another loss;
  head_options  spec fields of the head: `decode` ('expectation' / 'median'), loss options (sigma, lambda_l1,
          lambda_mean, lambda_variance, phi, scale, mean_over_tasks, norm), `calibrate` (a centre in years: the
          head's age a becomes scale (a - centre) + centre + shift, starting at 1 and 0, trained by L1;
          heads.CalibratedHead), and for a new head `num_classes` (default 101), `bin_values`,
          `head_init_std`, `init_age`, `regression_hidden`;
  backbone_overrides  fields merged into the backbone spec (conv_impl, dtype, bn_train, dropout).

A trial's draws (training subset, sample order, augmentation and dropout keys) depend only on the size and the
trial's seed, never on the prior entry, so priors differing only in their head compare heads on the same draws.
"""

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from agejax.errors import ConfigError
from agejax.models import build_model, load_pretrained
from agejax.models.heads import AGE_KINDS, LOSS_OPTIONS, SOFTMAX_KINDS, AgeHead, age_head
from agejax.models.pretrained import Preprocess, read_prior_metadata
from agejax.models.registry import AgeModel


@dataclasses.dataclass
class Prior:
  """A resolved prior: the model to train, its starting variables and preprocessing."""

  name: str
  spec: dict[str, Any]
  model: AgeModel
  variables: dict[str, Any]
  preprocess: Preprocess
  new_head: bool

  def head_kind(self) -> AgeHead:
    """The resolved age head (kind, bins, decoder, loss options): what the engine's `head` argument takes."""
    return age_head(self.spec)


NEW_HEAD_FIELDS = ("num_classes", "bin_values", "head_init_std", "init_age", "regression_hidden")
HEAD_FIELDS = ("decode", "calibrate") + NEW_HEAD_FIELDS
_LOSS_OPTION_NAMES = sorted({k for options in LOSS_OPTIONS.values() for k in options})


def _plain(value: Any) -> Any:
  """A config value as plain Python (a ConfigDict as a dict), so specs stay JSON-serialisable."""
  return value.to_dict() if hasattr(value, "to_dict") else value


def head_spec(spec: Mapping[str, Any], entry: Mapping[str, Any], model_cfg: Mapping[str, Any], new: bool,
              name: str) -> dict[str, Any]:
  """`spec` with the age head of a prior entry (`head_type`, `head_options`; see the module docstring)."""
  spec = dict(spec)
  options = dict(entry.get("head_options") or {})
  unknown = sorted(set(options) - set(HEAD_FIELDS) - set(_LOSS_OPTION_NAMES))
  if unknown:
    raise ConfigError(f"priors[{name}].head_options.{unknown[0]} is not a head option; expected "
                      f"{', '.join(HEAD_FIELDS)} or a loss option ({', '.join(_LOSS_OPTION_NAMES)})")
  kind = entry.get("head_type") or (model_cfg.get("head", "dex") if new else spec.get("head"))
  if kind not in AGE_KINDS:
    raise ConfigError(f"priors[{name}].head_type={kind!r}; expected one of {', '.join(AGE_KINDS)}")
  if new:
    spec["head"], spec["num_classes"] = kind, 101
    inherited = ["regression_hidden", "init_age", "head_init_std", "bin_values"]
    if kind == model_cfg.get("head", "dex"):  # config.model's decoder and loss options are its kind's
      inherited += ["decode", "loss_options"]
    for k in (*inherited, "decode", "loss_options", "calibrate"):
      spec.pop(k, None)
    spec.update({k: _plain(model_cfg[k]) for k in inherited if k in model_cfg})
  else:
    own = spec.get("head")
    if own not in AGE_KINDS:
      raise ConfigError(
          f"prior {name!r} keeps its own {own!r} head with {spec.get('num_classes')} outputs, which does not "
          f"predict age; set priors[{name}].head='new'")
    if kind != own and not (kind in SOFTMAX_KINDS and own in SOFTMAX_KINDS):
      raise ConfigError(f"priors[{name}].head_type={kind!r} cannot reuse the kept {own!r} layer (only softmax kinds "
                        f"{', '.join(SOFTMAX_KINDS)} share one); set priors[{name}].head='new'")
    fixed = sorted(set(options) & set(NEW_HEAD_FIELDS))
    if spec.get("calibrate") is not None and options.get("calibrate", spec["calibrate"]) != spec["calibrate"]:
      fixed.insert(0, "calibrate")  # the checkpoint's scale and shift were fitted around its own centre
    if fixed:
      raise ConfigError(f"priors[{name}].head_options.{fixed[0]} is fixed by the kept head; set "
                        f"priors[{name}].head='new' to change it")
    if kind != own:
      spec.pop("loss_options", None)  # the checkpoint's options were its own kind's
    spec["head"] = kind
  loss_options = {k: v for k, v in options.items() if k not in HEAD_FIELDS}
  spec.update({k: _plain(v) for k, v in options.items() if k in HEAD_FIELDS})
  if loss_options:
    spec["loss_options"] = {**dict(spec.get("loss_options") or {}), **loss_options}
  try:
    age_head(spec)
  except ConfigError as e:
    raise ConfigError(f"priors[{name}] ({kind} head): {e}") from None
  return spec


def _with_overrides(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
  spec = copy.deepcopy(dict(spec))
  spec["backbone"] = {**dict(spec.get("backbone", {})), **dict(overrides or {})}
  return spec


def resolve_prior(entry: Mapping[str, Any], model_cfg: Mapping[str, Any], image_size: int, seed: int) -> Prior:
  """Builds a Prior from one config entry."""
  name = entry.get("name") or "prior"
  head_mode = entry.get("head", "new")
  if head_mode not in ("keep", "new"):
    raise ConfigError(f"priors[{name}].head must be 'keep' or 'new', got {head_mode!r}")
  overrides = dict(entry.get("backbone_overrides", {}) or {})
  if entry.get("dir"):
    meta = read_prior_metadata(entry["dir"])  # a clear error when the directory is not a prior
    _, variables, preprocess = load_pretrained(entry["dir"])
    spec = _with_overrides(meta["model"], overrides)
  elif entry.get("model"):
    spec = _with_overrides(entry["model"], overrides)
    model = build_model(spec)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    # The 'rbg' PRNG: XLA:CPU compiles a VGG-16's threefry initialisation in ~17 s, rbg's in ~4 s; the
    # weights still depend only on the seed. (Trial keys stay on the default PRNG.)
    with jax.default_prng_impl("rbg"):
      variables = jax.jit(lambda k: model.init(k, x))(jax.random.key(seed))
    preprocess = Preprocess.from_dict(entry.get("preprocess", model_cfg.get("preprocess", {})))
  else:
    raise ConfigError(f"priors[{name}] needs `dir` (a prior directory) or `model` (a spec to start from scratch)")
  was_calibrated = spec.get("calibrate") is not None
  spec = head_spec(spec, entry, model_cfg, head_mode == "new", name)
  model = build_model(spec)
  variables = dict(variables)
  if head_mode == "new":
    variables["params"] = dict(variables["params"])
    variables["params"]["head"] = init_head(model, variables, image_size, jax.random.key(seed))
  elif spec.get("calibrate") is not None and not was_calibrated:
    variables["params"] = {**variables["params"], "head": calibrated_head_params(variables["params"]["head"])}
  return Prior(name, spec, model, variables, preprocess, head_mode == "new")


def calibrated_head_params(head_params: Any) -> dict[str, Any]:
  """A kept head's parameters inside a `CalibratedHead` that starts as the identity (scale 1, shift 0)."""
  return {"inner": head_params, "scale": jnp.ones((), jnp.float32), "shift": jnp.zeros((), jnp.float32)}


def feature_dim(model: AgeModel, variables: Mapping[str, Any], image_size: int) -> int:
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  backbone_vars = {k: {"backbone": v["backbone"]} for k, v in variables.items() if "backbone" in v}
  out = jax.eval_shape(
      lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone(x, train=False)), backbone_vars, x)
  return out.shape[-1]


def init_head(model: AgeModel, variables: Mapping[str, Any], image_size: int, key: jax.Array) -> Any:
  """Fresh head parameters for the model's feature size."""
  dim = feature_dim(model, variables, image_size)
  return model.head.init(key, jnp.zeros((1, dim), jnp.float32))["params"]
