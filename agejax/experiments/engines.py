"""A prior's compiled programs, and the explicit caches that let priors share them.

`with_engine_backbone` applies config.trials' convolution implementation and compute dtype to a prior;
`PriorEngine` is what one architecture compiles once for a whole study (optimiser, chunk and predict programs,
a runner per strategy, the trial starter). `engine_for` looks engines up in a caller's dict keyed by what
defines those programs (`engine_key`): priors of one spec share an engine and pass their own variables to it
(`PriorTrials`), nothing is swapped into it. `frozen_inputs` puts a frozen prefix's cached features (a
caller's dict of caches) in place of the images.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from agejax.engine import autotune
from agejax.engine import features as features_lib
from agejax.engine import memory as memory_lib
from agejax.engine import step as step_lib
from agejax.engine import trials as trials_lib
from agejax.engine.optim import make_optimizer
from agejax.errors import ConfigError
from agejax.experiments.priors import Prior, init_head
from agejax.experiments.study_data import StudyData
from agejax.models import build_model
from agejax.models.registry import with_conv_plan
from agejax.parallel import sharding as sharding_lib

log = logging.getLogger(__name__)


def with_engine_backbone(prior: Prior, conv_impl: str = "spec", compute_dtype: str = "spec") -> Prior:
  """The prior with the engine's backbone settings: convolution implementation and compute dtype
  ('bfloat16' computes in bf16 while parameters and optimiser state stay float32). 'spec' keeps the prior's."""
  if conv_impl not in (*autotune.IMPLS, "auto", "spec"):
    raise ConfigError(f"config.trials.conv_impl={conv_impl!r}; expected 'auto', 'spec' or one of {autotune.IMPLS}")
  if compute_dtype not in ("spec", "float32", "bfloat16"):
    raise ConfigError(f"config.trials.compute_dtype={compute_dtype!r}; expected 'spec', 'float32' or 'bfloat16'")
  backbone = dict(prior.spec.get("backbone", {}))
  if conv_impl != "spec":
    backbone["conv_impl"] = conv_impl
  if compute_dtype != "spec":
    backbone["dtype"] = None if compute_dtype == "float32" else compute_dtype
  if backbone == dict(prior.spec.get("backbone", {})):
    return prior
  spec = {**prior.spec, "backbone": backbone}
  return dataclasses.replace(prior, spec=spec, model=build_model(spec))


def engine_prior(cfg: Any, prior: Prior) -> Prior:
  """`with_engine_backbone` with config.trials' conv_impl and compute_dtype."""
  return with_engine_backbone(prior, cfg.trials.conv_impl, cfg.trials.compute_dtype)


def planned_model(cfg: Any, prior: Prior, frozen: "features_lib.FrozenPrefix | None", plan_file: str | None) -> Any:
  """The engine's model (the prior's, or the frozen prefix's tail) with its 'auto' convolutions' plan in its spec.

  Processes must compile identical programs and their timings could disagree: process 0 measures (or follows
  its plan file) and every process takes its choices."""
  main = jax.process_index() == 0
  plan = autotune.plan_model(prior.model, prior.variables, (cfg.batch_size, cfg.data.crop, cfg.data.crop, 3),
                             plan_file=plan_file if main else None, measure=main)
  plan = dict(zip(plan, sharding_lib.same_choices(list(plan.values()), autotune.IMPLS)))
  log.info("prior %s: convolution plan %s", prior.name, autotune.counts_of(plan))
  planned = build_model(with_conv_plan(prior.spec, plan))
  return frozen.tail.clone(backbone=planned.backbone) if frozen else planned


def conv_plan_file(cfg: Any, workdir: str) -> str:
  """The workdir's convolution plan (`conv_plan.json`), seeded from `config.trials.conv_plan` if set."""
  path = os.path.join(workdir, "conv_plan.json")
  seed_file = cfg.trials.conv_plan
  if seed_file and not os.path.exists(path):
    if not os.path.exists(seed_file):
      raise ConfigError(f"config.trials.conv_plan={seed_file!r} does not exist")
    autotune.write_plan_file(path, autotune.read_plan_file(seed_file))
  return path


def new_head_fn(prior: Prior, image_size: int,
                frozen: "features_lib.FrozenPrefix | None" = None) -> Callable[[Any, jax.Array], Any]:
  """`(variables, key) -> head params`: the paper's new head (gaussian std 0.01) for the prior's feature size, or
  over a frozen prefix's tail variables (drawn exactly as the full model's)."""
  if frozen:
    return frozen.draw_head
  return lambda variables, key: init_head(prior.model, variables, image_size, key)


def trial_starter(prior: Prior, optimizer: Any, image_size: int) -> Callable[[int], trials_lib.TrialState]:
  """seed -> a trial's starting state from the prior (a new head drawn from the seed if the prior gets one)."""
  start = step_lib.make_initial_state(optimizer, new_head_fn(prior, image_size) if prior.new_head else None)
  return lambda seed: start(prior.variables, seed)


def _trial_chunk(cfg: Any, name: str, memory: Any, shared_bytes: int) -> int:
  """config.trials.trial_chunk, lowered to the trials whose memory fits the budget together."""
  trial_chunk = cfg.trials.trial_chunk
  budget = float(cfg.trials.memory_budget_gb) * 2**30 or memory_lib.device_memory_bytes()
  if budget:
    fit = memory_lib.trials_that_fit(memory, int(budget), shared_bytes)
    if fit < (trial_chunk or 2**31):
      log.info("prior %s: ~%.0f MB per trial; at most %d trials fit the %.1f GB budget together (a 'vmap' or "
               "'map' group holds no more)", name, memory.total / 2**20, fit, budget / 2**30)
      return fit
  return trial_chunk


class PriorEngine:
  """Compiled pieces for one prior architecture, shared by every size (and by priors of one spec): optimiser,
  chunk and predict functions, a runner per strategy, the starter. A prior's own variables are arguments."""

  def __init__(self, cfg: Any, prior: Prior, chunk_steps: int, shared_bytes: int = 0, plan_file: str | None = None,
               frozen: "features_lib.FrozenPrefix | None" = None):
    self.cfg, self.chunk_steps, self.spec = cfg, chunk_steps, prior.spec
    # A frozen prefix: trials train its tail on cached features (no crop, no preprocessing left to do).
    model, variables = (frozen.tail, frozen.tail_variables) if frozen else (prior.model, prior.variables)
    preprocess, inputs = ((lambda x: x), frozen.cached_inputs) if frozen else (prior.preprocess, None)
    self.variables, self.new_head = variables, prior.new_head  # the first prior's: initial_state's defaults
    self.eval_crop = None if frozen else cfg.data.crop
    self.freeze = frozen.freeze if frozen else "none"
    if prior.spec.get("backbone", {}).get("conv_impl") == "auto":
      model = planned_model(cfg, prior, frozen, plan_file)
    self.optimizer = make_optimizer(cfg.optim, variables["params"])
    self.step_cfg = trials_lib.StepConfig(cfg.batch_size, cfg.data.crop, mirror=cfg.data.mirror,
                                          random_crop=cfg.data.random_crop)
    self.memory = memory_lib.estimate_trial_memory(model, variables, jax.eval_shape(self.optimizer.init,
                                                                                    variables["params"]),
                                                   cfg.batch_size, cfg.data.crop,
                                                   frozen.feature_shape if frozen else None,
                                                   frozen.feature_dtype if frozen else jnp.float32)
    self.trial_chunk = _trial_chunk(cfg, prior.name, self.memory, shared_bytes)
    self.chunk_fn = trials_lib.make_train_chunk(model, prior.head_kind(), preprocess, self.optimizer, self.step_cfg,
                                                inputs)
    self.predict_fn = trials_lib.make_predict(model, prior.head_kind(), preprocess)
    # Compiled lazily, once: (variables, seed) -> state, with and without a new head.
    self._starters = {True: step_lib.make_initial_state(self.optimizer, new_head_fn(prior, cfg.data.crop, frozen)),
                      False: step_lib.make_initial_state(self.optimizer)}
    self._runners: dict[str, trials_lib.TrialRunner] = {}
    self.auto_choice: str | None = None  # 'auto' measures once per engine, at its first size with several trials

  def runner(self, strategy: str) -> trials_lib.TrialRunner:
    if strategy not in self._runners:
      self._runners[strategy] = trials_lib.TrialRunner(self.chunk_fn, self.predict_fn, strategy, self.trial_chunk)
    return self._runners[strategy]

  @property
  def runners(self) -> dict[str, trials_lib.TrialRunner]:
    """The runners made so far, by strategy."""
    return dict(self._runners)

  def initial_state(self, seed: int, variables: Any = None, new_head: bool | None = None) -> trials_lib.TrialState:
    """A trial's starting state from `variables` (default: the prior the engine was built for)."""
    new_head = self.new_head if new_head is None else new_head
    return self._starters[new_head](self.variables if variables is None else variables, seed)


@dataclasses.dataclass(frozen=True)
class PriorTrials:
  """One prior's trials: the (shared) engine, the prior (as resolved) and its frozen split, whose variables the
  trials start from."""

  engine: PriorEngine
  prior: Prior
  frozen: "features_lib.FrozenPrefix | None" = None

  def initial_state(self, seed: int) -> trials_lib.TrialState:
    variables = self.frozen.tail_variables if self.frozen else self.prior.variables
    return self.engine.initial_state(seed, variables, self.prior.new_head)


def engine_key(cfg: Any, prior: Prior, frozen: "features_lib.FrozenPrefix | None") -> str:
  """What defines an engine's programs: spec, preprocessing, solver (and a frozen prefix's freeze and view)."""
  key = json.dumps([prior.spec, prior.preprocess.to_dict(), cfg.optim.to_dict()], sort_keys=True, default=str)
  if frozen:
    key += json.dumps([frozen.freeze, dataclasses.asdict(frozen.view)])
  return key


def engine_for(engines: dict[str, PriorEngine], cfg: Any, workdir: str, prior: Prior, chunk_steps: int,
               shared_bytes: int, frozen: "features_lib.FrozenPrefix | None" = None) -> PriorTrials:
  """The prior's trials on the engine of `engines` its programs need, made (and added) when missing. The trials
  keep the prior as resolved (its saved trials record its own spec, not the engine's backbone settings)."""
  engined = engine_prior(cfg, prior)
  key = engine_key(cfg, engined, frozen)
  if key not in engines:
    shared = shared_bytes + (frozen.device_bytes if frozen else 0)
    engines[key] = PriorEngine(cfg, engined, chunk_steps, shared, plan_file=conv_plan_file(cfg, workdir),
                               frozen=frozen)
  return PriorTrials(engines[key], prior, frozen)


def _cache_key(cfg: Any, entry: Mapping[str, Any], prior: Prior, freeze: str) -> str:
  """Entries of one prior, freeze and data view share a feature cache."""
  return json.dumps([entry.get("dir") or cfg.seed, prior.spec["arch"], prior.spec.get("backbone"),
                     prior.preprocess.to_dict(), freeze, int(cfg.trials.cached_crops), cfg.data.to_dict()],
                    sort_keys=True, default=str)


def frozen_inputs(caches: dict[str, dict[str, Any]], cfg: Any, entry: Mapping[str, Any], prior: Prior,
                  data: StudyData, dev: dict[str, Any], shared_bytes: int, progress: bool) -> dict[str, Any]:
  """`dev` for a prior: with `freeze` (the entry's, else config.trials.freeze) other than 'none', the frozen
  prefix's cached features replace the images (`dev['frozen']` is the split). Caches live in `caches`; a cache
  that does not fit half the device budget stays in host memory, older ones are dropped to make room."""
  freeze = entry.get("freeze", cfg.trials.freeze)
  where = f"priors[{prior.name}].freeze" if "freeze" in entry else "config.trials.freeze"
  features_lib.check_freeze(freeze, prior.model.backbone, where)
  if freeze == "none":
    return dev
  prior = engine_prior(cfg, prior)
  crops = int(cfg.trials.cached_crops)
  frozen = features_lib.build_frozen(prior, freeze, cfg.data, data.pool_images.shape[1], crops, where)
  key = _cache_key(cfg, entry, prior, freeze)
  budget = float(cfg.trials.memory_budget_gb) * 2**30 or memory_lib.device_memory_bytes() or 0
  if key not in caches:
    need = frozen.cache_bytes(len(data.pool_images), len(data.test_images))
    while budget and caches and sum(c["bytes"] for c in caches.values()) + need > budget / 2 * memory_lib.SAFETY:
      caches.pop(next(iter(caches)))  # the oldest cache first
    other = shared_bytes + sum(c["bytes"] for c in caches.values())
    cache = features_lib.compute_cache(frozen, data.pool_images, data.test_images, cfg.eval_batch_size,
                                       budget / 2, other, progress, prior.name)
    cache["bytes"] = need if cache["on_device"] else 0
    caches[key] = cache
  cache = caches[key]
  frozen.device_bytes = cache["bytes"]
  return {**dev, "pool_images": cache["pool_images"], "test_images": cache["test_images"], "frozen": frozen}
