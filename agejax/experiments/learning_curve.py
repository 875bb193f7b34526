"""The few-shot learning curve (paper §4.1, Tables 1-2, Fig. 4): for each prior and training-set size,
T trials fine-tuned from the prior on disjoint random draws, evaluated on one fixed test set.

Outputs in the workdir: results.csv (a row per trial), table.md, learning_curve.png, splits/ (every
trial's training list), config.json, data_report.json, conv_plan.json (the convolution implementation
each layer used, followed again by a rerun in the same workdir), tb/ (TensorBoard), checkpoints/ (the best and
median trial of each size as prior directories, usable by `agejax.predict`), ckpt/ (checkpoints inside
the size being trained, agejax.engine.checkpoint). A rerun of the same command skips the (prior, size)
pairs already in results.csv and resumes an interrupted size from its latest checkpoint. Groups of trials
are sharded over the devices of `config.mesh` (agejax.parallel.sharding).
"""

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from agejax.engine import checkpoint as checkpoint_lib
from agejax.engine import features as features_lib
from agejax.engine import memory as memory_lib
from agejax.engine import metrics as metrics_lib
from agejax.engine import trials as trials_lib
from agejax.engine.optim import make_optimizer
from agejax.errors import ConfigError, TrainingError
from agejax.experiments.priors import Prior, init_head, resolve_prior
from agejax.experiments.study_data import StudyData, check_view, data_view, load_study_data
from agejax.models import build_model, conv_tuning
from agejax.models.pretrained import METADATA_FILE, save_pretrained
from agejax.parallel import sharding as sharding_lib
from agejax.reports import plots, tables
from agejax.reports.tensorboard import StudyBoard, study_hparams
from agejax.reports.workdir import prepare_workdir

log = logging.getLogger(__name__)


def size_schedule(cfg: Any, num_bases: int) -> list[dict[str, int]]:
  """[{n, trials, stepsize, max_iter}] from `config.sizes` rows (n, trials, stepsize, max_iter).

  n may be a fraction of the pool (< 1.0) and is capped by the pool; `config.steps_scale` multiplies
  stepsize and max_iter (a runlocal switch), never below `config.min_steps`.
  """
  out, scale = [], float(cfg.get("steps_scale", 1.0))
  for row in cfg.sizes:
    n, trials, stepsize, max_iter = row
    n = int(round(n * num_bases)) if isinstance(n, float) and n <= 1.0 else int(n)
    if n > num_bases:
      log.warning("size %d exceeds the pool (%d base images): capped", n, num_bases)
      n = num_bases
    if n < 1:
      continue
    max_iter = max(int(round(max_iter * scale)), int(cfg.get("min_steps", 1)))
    stepsize = max(int(round(stepsize * scale)), 1)
    out.append({"n": n, "trials": int(trials), "stepsize": stepsize, "max_iter": max_iter})
  return out


# What a prior entry's own `optim` may set (agejax.engine.optim.make_optimizer reads these).
OPTIM_FIELDS = ("name", "base_lr", "momentum", "weight_decay", "gamma", "rules")


def prior_config(cfg: Any, entry: Mapping[str, Any]) -> Any:
  """The study config as one prior sees it: `entry['optim']` merged into `cfg.optim` (its own solver: name,
  base_lr, rules...) and `entry['data']` into `cfg.data` (its own framing of the same images:
  study_data.VIEW_FIELDS). An entry with neither returns `cfg` itself."""
  name = entry.get("name")
  optim, view = dict(entry.get("optim") or {}), dict(entry.get("data") or {})
  if not optim and not view:
    return cfg
  unknown = sorted(set(optim) - set(OPTIM_FIELDS))
  if unknown:
    raise ConfigError(f"priors[{name}].optim: unknown field(s) {', '.join(unknown)}; known: {', '.join(OPTIM_FIELDS)}")
  check_view(view, f"priors[{name}].data")
  out = cfg.copy_and_resolve_references()
  for section, own in (("optim", optim), ("data", view)):
    with out[section].unlocked():
      out[section].update(own)
  return out


TRAIN_LOSS_STEPS = 10  # results.csv's train_loss: a trial's mean loss over its last 10 steps


def final_train_loss(losses: np.ndarray, max_iter: int) -> float:
  """The mean of a trial's last TRAIN_LOSS_STEPS losses (all of them when it ran fewer steps); `losses` may run
  past `max_iter` (padded chunks), so it is defined the same whatever `trials.chunk_steps` is."""
  done = np.asarray(losses)[:max_iter]
  return float(done[-min(TRAIN_LOSS_STEPS, len(done)):].mean())


def trial_seed(base_seed: int, trial: int) -> int:
  """Seed of trial `trial`: a lone run with `seed=s` and one trial reproduces trial s - base_seed."""
  return int(base_seed) + int(trial)


def draw_subset(data: StudyData, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(base ids, pool item indices) of n base images drawn without replacement."""
  rng = np.random.default_rng([seed, n])
  bases = np.sort(rng.choice(data.num_bases, size=n, replace=False))
  members = data.group_members()
  items = np.concatenate([members[b] for b in bases])
  return bases, items


def make_initial_state(prior: Prior, optimizer: Any, image_size: int) -> Callable[[int], trials_lib.TrialState]:
  """seed -> the trial's starting state (the prior's weights, a new head drawn from the seed if the prior gets
  one, fresh optimiser state, the trial's PRNG key), as one compiled program: built op by op, a trial's
  start cost ~0.2 s of dispatches, longer than a demo trial trains. The prior's weights are an argument,
  not constants baked into the program."""

  def start(variables: Any, seed: jax.Array) -> trials_lib.TrialState:
    key = jax.random.key(seed)
    params = dict(variables["params"])
    if prior.new_head:  # the paper's new 101-way head: gaussian std 0.01, drawn per trial
      params["head"] = init_head(prior.model, variables, image_size, jax.random.fold_in(key, 3))
    return trials_lib.TrialState(params, variables.get("batch_stats", {}), optimizer.init(params), key)

  start = jax.jit(start)
  return lambda seed: start(prior.variables, jnp.asarray(seed, jnp.uint32))


def with_engine_backbone(prior: Prior, conv_impl: str = "spec", compute_dtype: str = "spec") -> Prior:
  """The prior with the engine's backbone settings: convolution implementation and compute dtype
  ('bfloat16' computes in bf16 while parameters and optimiser state stay float32). 'spec' keeps the prior's."""
  if conv_impl not in (*conv_tuning.IMPLS, "auto", "spec"):
    raise ConfigError(f"config.trials.conv_impl={conv_impl!r}; expected 'auto', 'spec' or one of {conv_tuning.IMPLS}")
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


class PriorEngine:
  """Compiled pieces for one prior, shared by every size: optimiser, chunk and predict functions, runners."""

  def __init__(self, cfg: Any, prior: Prior, chunk_steps: int, shared_bytes: int = 0, plan_file: str | None = None,
               frozen: "features_lib.FrozenPrefix | None" = None):
    self.cfg, self.prior, self.chunk_steps, self.frozen = cfg, prior, chunk_steps, frozen
    # A frozen prefix: trials train its tail on cached features (no crop, no preprocessing left to do).
    model, variables = (frozen.tail, frozen.tail_variables) if frozen else (prior.model, prior.variables)
    preprocess, inputs = ((lambda x: x), frozen.cached_inputs) if frozen else (prior.preprocess, None)
    self.eval_crop = None if frozen else cfg.data.crop
    self.freeze = frozen.freeze if frozen else "none"
    if prior.spec.get("backbone", {}).get("conv_impl") == "auto":
      # Processes must compile identical programs and their timings could disagree: process 0 measures (or
      # follows its plan file) and every process takes its choices.
      main = jax.process_index() == 0
      plan = conv_tuning.plan_model(prior.model, prior.variables, (cfg.batch_size, cfg.data.crop, cfg.data.crop, 3),
                                    plan_file=plan_file if main else None, measure=main)
      plan = dict(zip(plan, sharding_lib.same_choices(list(plan.values()), conv_tuning.IMPLS)))
      conv_tuning.set_plan(plan)
      log.info("prior %s: convolution plan %s", prior.name, conv_tuning.counts_of(plan))
    self.optimizer = make_optimizer(cfg.optim, variables["params"])
    self.step_cfg = trials_lib.StepConfig(cfg.batch_size, cfg.data.crop, mirror=cfg.data.get("mirror", True),
                                          random_crop=cfg.data.get("random_crop", True))
    self.trial_chunk = cfg.trials.get("trial_chunk", 0)
    self.memory = memory_lib.estimate_trial_memory(model, variables, jax.eval_shape(self.optimizer.init,
                                                                                    variables["params"]),
                                                   cfg.batch_size, cfg.data.crop,
                                                   frozen.feature_shape if frozen else None,
                                                   frozen.feature_dtype if frozen else jnp.float32)
    budget = float(cfg.trials.get("memory_budget_gb", 0.0)) * 2**30 or memory_lib.device_memory_bytes()
    if budget:
      fit = memory_lib.trials_that_fit(self.memory, int(budget), shared_bytes)
      if fit < (self.trial_chunk or 2**31):
        log.info("prior %s: ~%.0f MB per trial; at most %d trials fit the %.1f GB budget together (a 'vmap' or "
                 "'map' group holds no more)", prior.name, self.memory.total / 2**20, fit, budget / 2**30)
        self.trial_chunk = fit
    self.chunk_fn = trials_lib.make_train_chunk(model, prior.head_kind(), preprocess, self.optimizer, self.step_cfg,
                                                inputs)
    self.predict_fn = trials_lib.make_predict(model, prior.head_kind(), preprocess)
    self._runners: dict[str, trials_lib.TrialRunner] = {}
    self.auto_choice: str | None = None
    self._initial_state: tuple[Prior, Callable[[int], trials_lib.TrialState]] | None = None  # (prior, its starter)

  def runner(self, strategy: str) -> trials_lib.TrialRunner:
    if strategy not in self._runners:
      self._runners[strategy] = trials_lib.TrialRunner(self.chunk_fn, self.predict_fn, strategy, self.trial_chunk)
    return self._runners[strategy]

  def initial_state(self, seed: int) -> trials_lib.TrialState:
    if self._initial_state is None or self._initial_state[0] is not self.prior:  # priors of one spec share engines
      self._initial_state = (self.prior, self.frozen.initial_state(self.optimizer) if self.frozen else
                             make_initial_state(self.prior, self.optimizer, self.cfg.data.crop))
    return self._initial_state[1](seed)


def _scores(pred: np.ndarray, data: StudyData) -> dict[str, float]:
  return metrics_lib.age_metrics(pred, data.test_ages, data.test_sigma)


class TrialKeeper:
  """Keeps each trial's final state until the size's best and median trials are known.

  States stay in host memory while they fit `budget_mb`; beyond that they are staged on disk as prior
  directories and the ones not picked are deleted at the end.
  """

  def __init__(self, workdir: str, prior: Prior, budget_mb: float, complete: Callable[[Any], Any] | None = None,
               training_data: Mapping[str, Any] | None = None):
    self.root = os.path.join(workdir, "checkpoints", prior.name)
    self.prior = prior
    self.training_data = training_data  # recorded in the saved trials' metadata (predict warns on synthetic)
    self.complete = complete or (lambda v: v)  # a frozen-prefix trial's tail variables -> the whole model's
    self.budget = budget_mb * 2**20
    self.held: dict[int, Any] = {}
    self.staged: dict[int, str] = {}
    self.used = 0

  def stage_path(self, n: int, trial: int) -> str:
    return os.path.join(self.root, f"n{n:05d}_staging", f"trial{trial:02d}")

  def keep(self, trial: int, n: int, state: trials_lib.TrialState) -> None:
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    size = sum(x.nbytes for x in jax.tree.leaves(variables))
    if self.used + size <= self.budget:
      self.held[trial] = jax.device_get(variables)
      self.used += size
    else:
      path = self.stage_path(n, trial)
      save_pretrained(path, self.prior.spec, self.complete(variables), self.prior.preprocess)
      self.staged[trial] = path

  def persist(self, n: int) -> None:
    """Stages the states held in memory on disk too, so a checkpoint of the size can resume without them."""
    for trial, variables in self.held.items():
      if trial not in self.staged:
        self.staged[trial] = self.stage_path(n, trial)
        save_pretrained(self.staged[trial], self.prior.spec, self.complete(variables), self.prior.preprocess)

  def adopt(self, n: int, trials: Any) -> bool:
    """Takes the staged states of `trials` (finished before a checkpoint); False if any is missing."""
    paths = {t: self.stage_path(n, t) for t in trials}
    if not all(os.path.exists(os.path.join(p, METADATA_FILE)) for p in paths.values()):
      return False
    self.staged.update(paths)
    return True

  def finish(self, n: int, rows: list[dict[str, Any]], which: str) -> None:
    import shutil

    order = np.argsort([r["mae"] for r in rows])
    picks = {"best": int(order[0]), "median": int(order[len(order) // 2])}
    if which == "all":
      picks.update({f"trial{t:02d}": t for t in range(len(rows))})
    for label, t in picks.items():
      out = os.path.join(self.root, f"n{n:05d}_{label}")
      source = {"format": "agejax-trial", "prior": self.prior.name, "n_train": n, "trial": t,
                "seed": rows[t]["seed"], "mae": rows[t]["mae"]}
      if t in self.held:
        variables = self.complete(self.held[t])
      else:
        from agejax.models.pretrained import load_pretrained
        _, variables, _ = load_pretrained(self.staged[t])
      save_pretrained(out, self.prior.spec, variables, self.prior.preprocess, source=source,
                      training_data=self.training_data)
      rows[t].setdefault("checkpoint", os.path.relpath(out, os.path.dirname(os.path.dirname(self.root))))
    shutil.rmtree(os.path.join(self.root, f"n{n:05d}_staging"), ignore_errors=True)


class Study:
  """Runs the learning curve of a config into a workdir."""

  def __init__(self, config: Any, workdir: str):
    self.cfg = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.results_path = os.path.join(workdir, "results.csv")

  # -- bookkeeping -----------------------------------------------------------------------------------
  def done_pairs(self) -> set[tuple[str, int]]:
    if not os.path.exists(self.results_path):
      return set()
    return {(r["prior"], int(r["n_train"])) for r in tables.read_results(self.results_path)}

  def write_splits(self, prior: str, n: int, trial: int, seed: int, bases: np.ndarray, data: StudyData) -> str:
    rel = os.path.join("splits", prior, f"n{n:05d}", f"trial{trial:02d}.txt")
    path = os.path.join(self.workdir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ages = {int(g): float(a) for g, a in zip(data.pool_groups, data.pool_ages)}
    with open(path, "w") as f:
      f.write(f"# prior={prior} n_train={n} trial={trial} seed={seed}\n")
      for b in bases:
        f.write(f"{data.pool_names[b]}\t{ages[int(b)]:g}\n")
    return rel

  def conv_plan_file(self) -> str:
    """The workdir's convolution plan (`conv_plan.json`), seeded from `config.trials.conv_plan` if set."""
    path = os.path.join(self.workdir, "conv_plan.json")
    seed_file = self.cfg.trials.get("conv_plan", "")
    if seed_file and not os.path.exists(path):
      if not os.path.exists(seed_file):
        raise ConfigError(f"config.trials.conv_plan={seed_file!r} does not exist")
      conv_tuning.write_plan_file(path, conv_tuning.read_plan_file(seed_file))
    return path

  # -- one size --------------------------------------------------------------------------------------
  def engine_prior(self, prior: Prior) -> Prior:
    return with_engine_backbone(prior, self.cfg.trials.get("conv_impl", "spec"),
                                self.cfg.trials.get("compute_dtype", "spec"))

  def engine_for(self, prior: Prior, frozen: "features_lib.FrozenPrefix | None" = None) -> "PriorEngine":
    """The compiled engine for a prior; priors of one architecture and preprocessing share it (and, with a
    frozen prefix, of one freeze and data view)."""
    prior = self.engine_prior(prior)
    key = json.dumps([prior.spec, prior.preprocess.to_dict(), self.cfg.optim.to_dict()], sort_keys=True, default=str)
    if frozen:
      key += json.dumps([frozen.freeze, dataclasses.asdict(frozen.view)])
    engines = self.__dict__.setdefault("_engines", {})
    if key not in engines:
      shared = getattr(self, "shared_bytes", 0) + (frozen.device_bytes if frozen else 0)
      engines[key] = PriorEngine(self.cfg, prior, self.chunk_steps, shared, plan_file=self.conv_plan_file(),
                                 frozen=frozen)
    engine = engines[key]
    engine.prior, engine.frozen = prior, frozen
    return engine

  def frozen_inputs(self, entry: Mapping[str, Any], prior: Prior, data: StudyData,
                    dev: dict[str, Any]) -> dict[str, Any]:
    """`dev` for a prior: with `freeze` (the entry's, else config.trials.freeze) other than 'none', the frozen
    prefix's cached features replace the images (`dev['frozen']` is the split). Entries of one prior, freeze
    and data view share one cache; a cache that does not fit half the device budget stays in host memory."""
    freeze = entry.get("freeze", self.cfg.trials.get("freeze", "none"))
    where = f"priors[{prior.name}].freeze" if "freeze" in entry else "config.trials.freeze"
    features_lib.check_freeze(freeze, prior.model.backbone, where)
    if freeze == "none":
      return dev
    prior = self.engine_prior(prior)
    crops = int(self.cfg.trials.get("cached_crops", 0))
    frozen = features_lib.build_frozen(prior, freeze, self.cfg.data, data.pool_images.shape[1], crops, where)
    key = json.dumps([entry.get("dir") or self.cfg.seed, prior.spec["arch"], prior.spec.get("backbone"),
                      prior.preprocess.to_dict(), freeze, crops, self.cfg.data.to_dict()], sort_keys=True,
                     default=str)
    caches = self.__dict__.setdefault("_feature_caches", {})
    budget = float(self.cfg.trials.get("memory_budget_gb", 0.0)) * 2**30 or memory_lib.device_memory_bytes() or 0
    if key not in caches:
      need = frozen.cache_bytes(len(data.pool_images), len(data.test_images))
      while budget and caches and sum(c["bytes"] for c in caches.values()) + need > budget / 2 * memory_lib.SAFETY:
        caches.pop(next(iter(caches)))  # the oldest cache first
      other = self.shared_bytes + sum(c["bytes"] for c in caches.values())
      cache = features_lib.compute_cache(frozen, data.pool_images, data.test_images,
                                         self.cfg.get("eval_batch_size", 64), budget / 2, other,
                                         self.is_main and self.cfg.get("progress", True), prior.name)
      cache["bytes"] = need if cache["on_device"] else 0
      caches[key] = cache
    cache = caches[key]
    frozen.device_bytes = cache["bytes"]
    return {**dev, "pool_images": cache["pool_images"], "test_images": cache["test_images"], "frozen": frozen}

  def run_size(self, prior: Prior, data: StudyData, dev: dict[str, jax.Array], size: Mapping[str, int],
               tb: StudyBoard) -> list[dict[str, Any]]:
    cfg = self.cfg
    n, num_trials, max_iter = size["n"], size["trials"], size["max_iter"]
    engine = self.engine_for(prior, dev.get("frozen"))
    k = engine.chunk_steps
    padded = -(-max_iter // k) * k
    seeds = [trial_seed(cfg.seed, t) for t in range(num_trials)]
    draws = [draw_subset(data, n, s) for s in seeds]
    orders = np.stack([trials_lib.sample_order(items, padded, cfg.batch_size, s)
                       for (_, items), s in zip(draws, seeds)])
    split_files = [self.write_splits(prior.name, n, t, s, draws[t][0], data) if self.is_main else ""
                   for t, s in enumerate(seeds)]
    hyper = trials_lib.Hyper(jnp.asarray(size["stepsize"], jnp.int32), jnp.asarray(max_iter, jnp.int32))
    make_states = lambda sl: [engine.initial_state(seeds[t]) for t in range(sl.start, sl.stop)]  # noqa: E731
    mesh = sharding_lib.MeshConfig.from_config(cfg)
    for name in trials_lib.STRATEGIES:
      engine.runner(name).set_mesh(mesh)
    trained_on = {"name": cfg.data.name, "synthetic": cfg.data.name == "synthetic"}
    keeper = TrialKeeper(self.workdir, prior, cfg.get("keep_states_mb", 2048),
                         engine.frozen.complete if engine.frozen else None, trained_on) if self._saving() else None
    ckpt = self.size_checkpoints(prior.name, size, k, engine.freeze)
    resume = self.resume_point(ckpt, keeper, engine, size) if ckpt else None
    if resume:
      strategy = resume["strategy"]
    else:
      strategy = sharding_lib.same_choice(self.pick_strategy(engine, make_states, orders[:, :k], hyper, dev),
                                          trials_lib.STRATEGIES)
    runner = engine.runner(strategy)
    groups = runner.slices(num_trials)

    losses = np.zeros((num_trials, padded), np.float32)
    preds = np.zeros((num_trials, len(data.test_ages)), np.float32)
    start_group, chunks, train_wall = 0, 0, 0.0
    if resume:
      host = ckpt.restore_host(resume["step"], {"losses": losses, "preds": preds})
      losses, preds = host["losses"], host["preds"]
      start_group, chunks, train_wall = resume["group"], resume["step"], resume["train_wall"]
      log.info("%s n=%d: resuming from checkpoint %d (group %d of %d, step %d) in %s", prior.name, n, chunks,
               start_group + 1, len(groups), resume["next_step0"], ckpt.directory)
    bar = tqdm(total=max_iter * num_trials, desc=f"{prior.name} n={n} x{num_trials} [{runner.strategy}]",
               unit="step", disable=not self.is_main or not cfg.get("progress", True), leave=False)
    if resume and start_group < len(groups):
      current = groups[start_group]
      bar.update(max_iter * current.start + resume["next_step0"] * (current.stop - current.start))
    every = ckpt.config.every_chunks if ckpt else 0
    t0 = time.perf_counter()
    for g in range(start_group, len(groups)):
      sl = groups[g]
      state = runner.group(make_states(sl))
      first = 0
      if resume and g == start_group and resume["has_state"]:
        state, first = ckpt.restore_state(resume["step"], state), resume["next_step0"]
      group_orders = runner.group_rows(orders, sl)
      t_train = time.perf_counter()
      for step0 in range(first, max_iter, k):
        chunk_idx = group_orders[..., step0:step0 + k, :]
        pool, chunk_idx = features_lib.take_rows(dev["pool_images"], chunk_idx)  # a host cache: the rows used
        state, chunk_losses = runner.train(state, chunk_idx, step0, hyper, pool, dev["pool_ages"])
        losses[sl, step0:step0 + k] = chunk_losses
        valid = chunk_losses[:, : max_iter - step0]
        tb.chunk_losses(prior.name, n, sl.start, step0, valid)  # live: each chunk as it finishes
        if sl.stop == num_trials:  # the last group: every trial has these steps, so their mean is known
          tb.mean_losses(prior.name, n, step0, losses[:, step0:min(step0 + k, max_iter)])
        if not np.isfinite(valid).all():
          t, s = map(int, np.argwhere(~np.isfinite(valid))[0])
          raise TrainingError(f"loss is {valid[t, s]} at prior {prior.name!r}, size {n}, trial {sl.start + t} "
                              f"(seed {seeds[sl.start + t]}), step {step0 + s}; lower optim.base_lr or check the data")
        bar.update(min(k, max_iter - step0) * (sl.stop - sl.start))
        chunks += 1
        if step0 + k >= max_iter:  # the group's last chunk: its end is saved below
          break
        stop = checkpoint_lib.stop_requested()
        if ckpt and (stop or chunks % every == 0):
          meta = dict(strategy=strategy, group=g, next_step0=step0 + k,
                      train_wall=train_wall + time.perf_counter() - t_train)
          ckpt.save(chunks, meta, {"losses": losses, "preds": preds}, state)
        if stop:
          self.stop_size(ckpt, prior.name, n, g, step0 + k)
      jax.block_until_ready(state)
      train_wall += time.perf_counter() - t_train
      preds[sl] = trials_lib.evaluate(runner, state, dev["test_images"], engine.eval_crop,
                                      cfg.get("eval_batch_size", 64), size=sl.stop - sl.start)
      if cfg.get("save_trials", "best_median") != "none":  # every process: a sharded group is gathered
        for t, st in zip(range(sl.start, sl.stop), runner.ungroup(state, sl.stop - sl.start)):
          if keeper:
            keeper.keep(t, n, st)
      del state
      if g + 1 < len(groups):  # the last group's results are written right after
        stop = checkpoint_lib.stop_requested()
        if ckpt:
          if keeper:
            keeper.persist(n)
          ckpt.save(chunks, dict(strategy=strategy, group=g + 1, next_step0=0, train_wall=train_wall),
                    {"losses": losses, "preds": preds})
        if stop:
          self.stop_size(ckpt, prior.name, n, g + 1, 0)
    bar.close()
    if ckpt:
      ckpt.close()
    wall = time.perf_counter() - t0
    losses = losses[:, :max_iter]
    tb.residuals(prior.name, n, preds - data.test_ages)

    rows = []
    for t in range(num_trials):
      train_mean = float(data.pool_ages[draws[t][1]].mean())
      rows.append({"prior": prior.name, "n_train": n, "trial": t, "seed": seeds[t], **_scores(preds[t], data),
                   "steps": max_iter, "wall_s": round(wall / num_trials, 4),
                   "train_loss": final_train_loss(losses[t], max_iter),
                   "baseline_mae": metrics_lib.mae(np.full_like(data.test_ages, train_mean), data.test_ages),
                   "strategy": runner.strategy, "freeze": engine.freeze,
                   "train_images_per_s": round(max_iter * cfg.batch_size * num_trials / max(train_wall, 1e-9), 2),
                   "split_file": split_files[t]})
    if keeper:
      keeper.finish(n, rows, self.cfg.get("save_trials", "best_median"))
    return rows

  # -- checkpoints inside a size -----------------------------------------------------------------------
  def checkpoint_dir(self, prior: str, n: int) -> str:
    return os.path.join(self.workdir, "ckpt", prior, f"n{n:05d}")

  def size_checkpoints(self, prior: str, size: Mapping[str, int], chunk_steps: int,
                       freeze: str = "none") -> "checkpoint_lib.SizeCheckpoints | None":
    """The checkpoints of a size (None if `config.checkpoint.enabled` is off)."""
    config = checkpoint_lib.CheckpointConfig.from_config(self.cfg)
    if not config.enabled:
      return None
    mesh = sharding_lib.MeshConfig.from_config(self.cfg)
    fingerprint = dict(prior=prior, **{k: int(v) for k, v in size.items()}, chunk_steps=chunk_steps,
                       batch_size=int(self.cfg.batch_size), seed=int(self.cfg.seed), mesh=[mesh.trial, mesh.data],
                       devices=jax.device_count(), processes=jax.process_count(),
                       save_trials=self.cfg.get("save_trials", "best_median"))
    if freeze != "none":  # a checkpoint of other trained variables must not be resumed
      fingerprint["freeze"] = freeze
    return checkpoint_lib.SizeCheckpoints(self.checkpoint_dir(prior, size["n"]), config, fingerprint)

  def resume_point(self, ckpt: "checkpoint_lib.SizeCheckpoints", keeper: "TrialKeeper | None", engine: "PriorEngine",
                   size: Mapping[str, int]) -> dict[str, Any] | None:
    """The latest usable checkpoint's metadata, or None to start the size over."""
    meta = ckpt.latest()
    if meta is None:
      return None
    groups = engine.runner(meta["strategy"]).slices(size["trials"])
    finished = groups[meta["group"]].start if meta["group"] < len(groups) else size["trials"]
    kept = keeper.adopt(size["n"], range(finished)) if keeper else True
    if not sharding_lib.any_process(not kept):
      return meta
    log.warning("checkpoint %s: the final states of finished trials are missing: starting the size over",
                ckpt.directory)
    return None

  def stop_size(self, ckpt: "checkpoint_lib.SizeCheckpoints | None", prior: str, n: int, group: int,
                step: int) -> None:
    """Ends the run on request (SIGTERM) once the checkpoint just saved is written."""
    if ckpt:
      ckpt.close()
      where = f"checkpoint in {ckpt.directory}; rerun the same command to continue"
    else:
      where = "no checkpoint (config.checkpoint.enabled is off): the size starts over on a rerun"
    raise checkpoint_lib.Preempted(f"stopped on request at prior {prior!r}, size {n}, group {group}, step {step}: "
                                   f"{where}")

  def check_stop(self, prior: str, size: Any) -> None:
    """Ends the run on request between sizes (nothing to save: finished sizes are in results.csv)."""
    if checkpoint_lib.stop_requested():
      n = size if size == 0 else size["n"]
      raise checkpoint_lib.Preempted(f"stopped on request before prior {prior!r}, size {n}; rerun the same command "
                                     "to continue")

  def clear_checkpoints(self, prior: str, n: int) -> None:
    """Deletes a size's checkpoints once its rows are in results.csv."""
    if n and checkpoint_lib.CheckpointConfig.from_config(self.cfg).enabled:
      checkpoint_lib.remove_checkpoints(self.checkpoint_dir(prior, n))

  def _saving(self) -> bool:
    return self.is_main and self.cfg.get("save_trials", "best_median") != "none"

  def pick_strategy(self, engine: "PriorEngine", make_states, first_chunk: np.ndarray, hyper, dev) -> str:
    strategy = self.cfg.trials.get("parallel", "auto")
    num_trials = len(first_chunk)
    if strategy != "auto":
      return strategy
    if num_trials == 1:
      return "loop"
    if engine.auto_choice:  # measured once per engine, at its first size with several trials
      return engine.auto_choice
    key = trials_lib.auto_key(engine.prior.spec, num_trials, engine.chunk_steps, dev["pool_images"].shape,
                              engine.step_cfg, engine.trial_chunk)

    pool, first_idx = features_lib.take_rows(dev["pool_images"], first_chunk)  # a host cache: the rows used

    def measure(name: str) -> float:
      return trials_lib.time_chunk(engine.runner(name), make_states, first_idx, hyper, pool, dev["pool_ages"])

    candidates = tuple(self.cfg.trials.get("auto_candidates") or trials_lib.default_candidates())
    choice, _ = trials_lib.choose_strategy(key, measure, candidates, log)
    engine.auto_choice = choice
    return choice

  # -- the whole study -------------------------------------------------------------------------------
  def size_zero(self, prior: Prior, data: StudyData, dev: dict[str, jax.Array]) -> dict[str, Any]:
    """The prior untouched (its new head, if any, drawn from the base seed)."""
    seed = trial_seed(self.cfg.seed, 0)
    engine = self.engine_for(prior, dev.get("frozen"))
    state = engine.initial_state(seed)
    runner = engine.runner("loop")
    t0 = time.perf_counter()
    preds = trials_lib.evaluate(runner, state, dev["test_images"], engine.eval_crop,
                                self.cfg.get("eval_batch_size", 64))
    return {"prior": prior.name, "n_train": 0, "trial": 0, "seed": seed, **_scores(preds[0], data), "steps": 0,
            "wall_s": round(time.perf_counter() - t0, 4), "baseline_mae": float("nan"), "freeze": engine.freeze}

  def run(self) -> list[dict[str, Any]]:
    cfg = self.cfg
    # Before anything is written: a workdir holding another config's results stops here, naming the fields.
    rerun = prepare_workdir(self.workdir, cfg) if self.is_main else False
    data = load_study_data(cfg.data, cfg.seed)
    if self.is_main:
      with open(os.path.join(self.workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2) if hasattr(cfg, "to_json_best_effort") else json.dumps(cfg))
      data.rejections.write(os.path.join(self.workdir, "data_report.json"))
      with open(os.path.join(self.workdir, "data_info.json"), "w") as f:
        json.dump(data.info, f, indent=2, default=str)
      os.makedirs(os.path.join(self.workdir, "splits"), exist_ok=True)
      with open(os.path.join(self.workdir, "splits", "test.txt"), "w") as f:
        f.write(f"# fixed test set: {len(data.test_names)} images\n")
        f.writelines(f"{name}\t{age:g}\n" for name, age in zip(data.test_names, data.test_ages))
    dev = {"pool_images": jnp.asarray(data.pool_images), "pool_ages": jnp.asarray(data.pool_ages),
           "test_images": jnp.asarray(data.test_images)}
    self.shared_bytes = memory_lib.tree_bytes(dev)
    sizes = size_schedule(cfg, data.num_bases)
    # One chunk length for the whole study, so one compiled program serves every size.
    self.chunk_steps = max(1, min([cfg.trials.get("chunk_steps", 50)] + [s["max_iter"] for s in sizes]))
    if not cfg.priors:
      raise ConfigError("config.priors is empty: add at least one prior (a prior directory or a model spec)")
    done = self.done_pairs()
    tb = StudyBoard(os.path.join(self.workdir, "tb"), enabled=self.is_main,
                    trial_losses=cfg.get("log_trial_losses", True))
    tb.layout([str(dict(e).get("name")) for e in cfg.priors], [s["n"] for s in sizes])
    pool_mean_mae = metrics_lib.mae(np.full_like(data.test_ages, data.pool_ages.mean()), data.test_ages)
    for entry in cfg.priors:
      entry = dict(entry)
      self.cfg = prior_config(cfg, entry)  # the study's config with this prior's own optim and data view
      prior_data = data_view(data, cfg.data, self.cfg.data)
      prior_dev = dev if prior_data is data else {**dev, "pool_images": jnp.asarray(prior_data.pool_images),
                                                  "test_images": jnp.asarray(prior_data.test_images)}
      if entry.get("pretrain"):
        from agejax.experiments.pretrain import pretrain_prior
        entry = {"name": entry["name"], "dir": pretrain_prior(entry, cfg, self.workdir, data.pool_ages),
                 "head": "keep", "backbone_overrides": entry.get("backbone_overrides", {})}
      name = entry.get("name") or "prior"
      todo = [] if (name, 0) in done or not cfg.get("eval_size_zero", True) else [0]
      todo += [s for s in sizes if (name, s["n"]) not in done]
      if rerun:
        skipped = sorted(n for p, n in done if p == name)
        pending = [str(t if t == 0 else t["n"]) for t in todo]
        log.info("prior %s: rerun skips the sizes already in results.csv (%s); to do: %s", name,
                 ", ".join(map(str, skipped)) or "none", ", ".join(pending) or "none")
      if not todo:
        continue
      prior = resolve_prior(entry, cfg.model, cfg.data.crop, cfg.seed)
      log.info("prior %s: %s head=%s (%s)", prior.name, prior.spec["arch"], prior.spec["head"],
               "new" if prior.new_head else "kept")
      prior_dev = self.frozen_inputs(entry, prior, prior_data, prior_dev)  # freeze: cached features for images
      for size in todo:
        self.check_stop(prior.name, size)
        if size == 0:
          rows = [self.size_zero(prior, prior_data, prior_dev)]
        else:
          rows = self.run_size(prior, prior_data, prior_dev, size, tb)
        if self.is_main:
          tables.append_results(self.results_path, rows)
          summary = metrics_lib.format_metrics({k: float(np.mean([r[k] for r in rows]))
                                                for k in metrics_lib.METRIC_NAMES})
          n = rows[0]["n_train"]
          log.info("%s n=%d (%d trials): %s", prior.name, n, len(rows), summary)
          head = f"{prior.spec['head']} ({'new' if prior.new_head else 'kept'})"
          tb.size_done(prior.name, rows, study_hparams(cfg, prior.name, head, rows))
          tb.curve(tables.read_results(self.results_path), baselines={"predict the pool mean": pool_mean_mae})
        self.clear_checkpoints(prior.name, rows[0]["n_train"])
    self.cfg = cfg
    if self.is_main:
      rows = tables.read_results(self.results_path)
      tables.write_tables(self.workdir, rows, title=cfg.get("title", "Few-shot learning curve"))
      plots.plot_learning_curve(rows, os.path.join(self.workdir, "learning_curve.png"),
                                baselines={"predict the pool mean": pool_mean_mae})
      tb.text("table", open(os.path.join(self.workdir, "table.md")).read(), 0)
      if cfg.get("diagnostics", True):  # split and resampled-source histograms (Fig. 3), duplicates: diagnostics/
        from agejax.reports.diagnostics import run_diagnostics
        run_diagnostics(self.workdir, logger=tb, split_ages={"pool": data.pool_ages, "test": data.test_ages})
    sharding_lib.barrier("study:end")  # process 0 has written every output
    tb.close()
    return tables.read_results(self.results_path)


def run(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Runs the learning-curve study of `config` in `workdir`; returns all result rows."""
  return Study(config, workdir).run()

