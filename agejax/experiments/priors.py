"""Priors: the initialisation a learning curve starts from, resolved from a config entry.

A prior entry (`config.priors[i]`) has:
  name    label in tables and plots;
  dir     an agejax prior directory (from `agejax.port` or a pre-training stage), or
  model   a model spec to initialise from scratch (tests, the demo);
  head    'keep' (the checkpoint's own head, which must be 'dex' or 'regression') or 'new'
          (a fresh head of `config.model.head`, initialised per trial from the trial's seed);
  backbone_overrides  fields merged into the backbone spec (conv_impl, dtype, bn_train, dropout).
"""

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from agejax.errors import ConfigError
from agejax.models import build_model, load_pretrained
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

  def head_kind(self) -> str:
    return self.spec["head"]


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
  if head_mode == "new":
    spec["head"] = model_cfg.get("head", "dex")
    spec["num_classes"] = 101
    for k in ("regression_hidden", "init_age", "head_init_std"):
      if k in model_cfg:
        spec[k] = model_cfg[k]
  elif spec.get("head") not in ("dex", "regression"):
    raise ConfigError(
        f"prior {name!r} keeps its own {spec.get('head')!r} head with {spec.get('num_classes')} outputs, which does "
        f"not predict age; set priors[{name}].head='new'")
  model = build_model(spec)
  variables = dict(variables)
  if head_mode == "new":
    variables["params"] = dict(variables["params"])
    variables["params"]["head"] = init_head(model, variables, image_size, jax.random.key(seed))
  return Prior(name, spec, model, variables, preprocess, head_mode == "new")


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
