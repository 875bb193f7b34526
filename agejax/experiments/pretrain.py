"""Pre-training stages: train a prior on a source dataset, optionally resampled to an age distribution.

A prior entry with a `pretrain` section is produced by this stage before the learning curve runs (paper
§4.2-4.3: DEX further trained on IMDB resampled to a uniform, the original or the target's distribution,
from 100, 1,000, 10,000 or all source samples). Fields of `pretrain`:
  data          the source (a `config.data`-like section merged over config.data; resize/crop from config.data);
  init_from     NAME of another prior entry to start from (its own stage runs first or is reused), e.g. the
                matched priors start from the prior trained on the source as is, as the paper starts from DEX;
                without it the stage starts from the entry's own `dir` / `model`;
  head          'new' (default: a fresh head of config.model.head) or 'keep' the starting checkpoint's head;
  distribution  {mode: 'uniform'|'matched'|'original', total: N}: resample the training part of the source
                to N samples (paper eq. 2-3; 0 = the size of the training part; `multiple` scales that, the
                paper's 4 N is multiple=4); 'matched' imposes the study's training-pool distribution;
  epochs | steps  length (epochs of the resampled set, or optimiser steps); with stop='converge' the cap;
  stop          'fixed' (train the full length) or 'converge': validate every `eval_every` steps (0 = one
                epoch) on a held-out part of the source (`val_fraction` or `val_size`, resampled like the
                training part) and stop after `patience` validations without an improvement of `min_delta`,
                keeping the best state;
  batch_size, optim (like config.optim; its base_lr is the stage's learning rate), stepsize (lr decay
  steps), mode ('full' or 'frozen').
The result is a prior directory under workdir/priors/NAME-HASH, the hash covering everything that defines
it (entry, parent stage, model, input size, seed, and the target histogram for 'matched'); a later run with
the same definition reuses it. `pretrain_stage.json` beside it records the histograms (source, resampled,
target), the validation history and the source test MAE. While a stage trains it checkpoints under
workdir/ckpt/NAME/ (config.checkpoint.every_steps; on SIGTERM too), so an interrupted stage resumes mid-stage,
mid-epoch, and ends with the prior an uninterrupted one makes.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agejax.data.distribution import age_histogram, resample_indices
from agejax.engine import checkpoint as checkpoint_lib
from agejax.engine import fit as fit_lib
from agejax.engine import metrics as metrics_lib
from agejax.engine import step as step_lib
from agejax.engine.checkpoint import FitCheckpointing
from agejax.errors import ConfigError
from agejax.models.pretrained import METADATA_FILE, save_pretrained
from agejax.parallel import sharding as sharding_lib
from agejax.reports.tensorboard import Logger, fit_logging

log = logging.getLogger(__name__)
STAGE_FILE = "pretrain_stage.json"
STOP_RULES = ("fixed", "converge")


def _plain(x: Any) -> Any:
  if isinstance(x, ml_collections.ConfigDict):
    return x.to_dict()
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def _find_entry(cfg: Any, name: str) -> Mapping[str, Any]:
  for entry in cfg.priors:
    if entry.get("name") == name:
      return entry
  raise ConfigError(f"pretrain.init_from={name!r} names no entry of config.priors "
                    f"(known: {', '.join(str(e.get('name')) for e in cfg.priors)})")


TARGETS = ("pool", "test")


def impose_target(entry: Mapping[str, Any], cfg: Any) -> str:
  """'pool' or 'test': whose ages the 'matched' stages of `entry` and its `init_from` chain impose.

  `distribution.target` is 'pool' by default (the study's training pool: no test label is read) or 'test' (the
  test set's histogram, as the authors imposed LAP's validation and MORPH's 2_1_test histogram). One target
  serves the whole chain, so matched stages in a chain that disagree are a config error.
  """
  seen: dict[str, str] = {}
  visited: set[str] = set()
  node: Mapping[str, Any] | None = entry
  while node is not None and node.get("pretrain"):
    visited.add(node["name"])
    dist = node["pretrain"].get("distribution") or {}
    if dist.get("mode") == "matched":
      target = dist.get("target", "pool")
      if target not in TARGETS:
        raise ConfigError(f"config.priors[{node['name']}].pretrain.distribution.target must be one of {TARGETS}, "
                          f"got {target!r}")
      seen[node["name"]] = target
    parent = node["pretrain"].get("init_from")
    node = _find_entry(cfg, parent) if parent else None
    if node is not None and node["name"] in visited:
      raise ConfigError(f"config.priors[{node['name']}]: its pretrain.init_from chain loops")
  if len(set(seen.values())) > 1:
    raise ConfigError(f"prior {entry['name']}: the matched stages of its init_from chain impose different targets "
                      f"({', '.join(f'{k}={v}' for k, v in seen.items())}); give them one distribution.target")
  return next(iter(seen.values()), "pool")


def impose_target_ages(entry: Mapping[str, Any], cfg: Any, pool_ages: np.ndarray, test_ages: np.ndarray) -> np.ndarray:
  """The ages whose histogram `entry`'s matched stages impose: the pool's, or the test set's for target='test'."""
  return np.asarray(test_ages if impose_target(entry, cfg) == "test" else pool_ages)


def _target_digest(entry: Mapping[str, Any], target_ages: np.ndarray | None) -> str | None:
  dist = entry["pretrain"].get("distribution") or {}
  if dist.get("mode") != "matched" or target_ages is None:
    return None
  return hashlib.sha256(age_histogram(target_ages).tobytes()).hexdigest()[:12]


def stage_key(entry: Mapping[str, Any], cfg: Any, target_ages: np.ndarray | None = None) -> str:
  """Hash of everything that defines a stage's result (a parent stage through its own key)."""
  parent = entry["pretrain"].get("init_from")
  parent_key = None
  if parent:
    p_entry = _find_entry(cfg, parent)
    parent_key = stage_key(p_entry, cfg, target_ages) if p_entry.get("pretrain") else _plain(p_entry)
  blob = json.dumps({"entry": _plain(entry), "parent": parent_key, "target": _target_digest(entry, target_ages),
                     "model": _plain(cfg.model), "resize": cfg.data.resize, "crop": cfg.data.crop, "seed": cfg.seed},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage_dir(entry: Mapping[str, Any], cfg: Any, workdir: str, target_ages: np.ndarray | None = None) -> str:
  return os.path.join(workdir, "priors", f"{entry['name']}-{stage_key(entry, cfg, target_ages)}")


def _check_source(name: str, data_cfg: Mapping[str, Any]) -> None:
  if data_cfg.get("name") == "synthetic":
    return
  root = data_cfg.get("root")
  if not root or not os.path.exists(root):
    raise ConfigError(f"config.priors[{name}].pretrain.data.root={root!r} is not an existing folder: point it at the "
                      f"source dataset ({data_cfg.get('name')}), e.g. with the config's source-path argument")


def split_source(ages: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(training indices, held-out validation indices) of the source pool, seeded."""
  order = np.random.default_rng([seed, 17]).permutation(len(ages))
  return np.sort(order[val_size:]), np.sort(order[:val_size])


def draw_training_set(ages: np.ndarray, dist: Mapping[str, Any] | None, target_ages: np.ndarray | None,
                      seed: int) -> np.ndarray:
  """Indices into `ages` of the (resampled) training set a `distribution` section asks for."""
  n = len(ages)
  if not dist:
    return np.arange(n)
  mode = dist.get("mode", "original")
  total = int(dist.get("total") or round(float(dist.get("multiple", 1.0)) * n))
  if mode == "original" and total == n:
    return np.arange(n)
  if mode == "matched" and target_ages is None:
    raise ConfigError("pretrain.distribution.mode='matched' needs the study's target ages (run it in a study)")
  return resample_indices(ages, mode, total, target_ages=target_ages if mode == "matched" else None, seed=seed)


def _val_set(ages: np.ndarray, idx: np.ndarray, dist: Mapping[str, Any] | None, target_ages: np.ndarray | None,
             seed: int) -> np.ndarray:
  """The held-out part resampled to the stage's distribution (its own size), so validation measures that."""
  mode = (dist or {}).get("mode", "original")
  if mode == "original" or len(idx) == 0:
    return idx
  pick = resample_indices(ages[idx], mode, len(idx), target_ages=target_ages if mode == "matched" else None,
                          seed=seed + 1)
  return idx[pick]


# A stage's own fields and their defaults (a `pretrain` section is a user mapping; these are declared once here).
STAGE_DEFAULTS: dict[str, Any] = dict(stop="fixed", steps=0, epochs=1.0, eval_every=0, patience=3, min_delta=0.0,
                                      stepsize=0, mode="full", val_size=0, val_fraction=0.1)


def stage_fields(p: Mapping[str, Any]) -> dict[str, Any]:
  """A `pretrain` section with STAGE_DEFAULTS filled in (its hash is taken from the section as written)."""
  return {**STAGE_DEFAULTS, **{k: v for k, v in dict(p).items() if v is not None}}


def _fit_config(p: Mapping[str, Any], cfg: Any) -> fit_lib.FitConfig:
  if not p.get("steps") and not p.get("epochs"):
    raise ConfigError("a pretrain section needs `steps` or `epochs` (the length, or its cap with stop='converge')")
  p = stage_fields(p)
  if p["stop"] not in STOP_RULES:
    raise ConfigError(f"pretrain.stop must be one of {STOP_RULES}, got {p['stop']!r}")
  return fit_lib.FitConfig(
      batch_size=int(p.get("batch_size", cfg.batch_size)), crop=int(cfg.data.crop), epochs=float(p["epochs"]),
      steps=int(p["steps"] or 0), mirror=bool(cfg.data.mirror), random_crop=bool(cfg.data.random_crop),
      eval_every=int(p["eval_every"] or 0), patience=int(p["patience"]) if p["stop"] == "converge" else 0,
      min_delta=float(p["min_delta"]), stepsize=int(p["stepsize"] or 0), eval_batch_size=int(cfg.eval_batch_size))


def _start(entry: Mapping[str, Any], cfg: Any, workdir: str, target_ages: np.ndarray | None) -> dict[str, Any]:
  """The prior entry a stage starts from: its own dir/model, or the result of `init_from`."""
  p = entry["pretrain"]
  start = {k: v for k, v in entry.items() if k not in ("pretrain", "head")}
  start["head"] = p.get("head", "new")
  if p.get("init_from"):
    parent = _find_entry(cfg, p["init_from"])
    if parent.get("pretrain"):
      start.update(dir=pretrain_prior(parent, cfg, workdir, target_ages), head=p.get("head", "keep"))
    else:
      start.update({k: parent[k] for k in ("dir", "model", "preprocess") if k in parent})
    start.pop("model" if start.get("dir") else "dir", None)
  return start


@dataclasses.dataclass
class _StageData:
  """A stage's source data and its parts: resampled training items, held-out validation, distribution."""

  data: Any
  data_cfg: dict[str, Any]
  dist: dict[str, Any] | None
  train_idx: np.ndarray
  val_idx: np.ndarray
  items: np.ndarray


def _stage_data(entry: Mapping[str, Any], cfg: Any, target_ages: np.ndarray | None) -> _StageData:
  """Loads the source of a stage and draws its training items and (stop='converge') validation set."""
  from agejax.experiments.study_data import load_study_data

  name, p = entry["name"], entry["pretrain"]
  data_cfg = {**_plain(cfg.data), **_plain(p["data"])}
  data = load_study_data(data_cfg, cfg.seed + 1000)
  dist = _plain(p.get("distribution")) or None
  val_idx = np.zeros(0, np.int64)
  train_idx = np.arange(len(data.pool_ages))
  p = stage_fields(p)
  if p["stop"] == "converge":
    val_size = int(p["val_size"] or round(float(p["val_fraction"]) * len(train_idx)))
    if val_size > len(train_idx) // 2:
      log.warning("prior %s: val_size %d capped at half the source pool (%d)", name, val_size, len(train_idx) // 2)
      val_size = len(train_idx) // 2
    train_idx, val_idx = split_source(data.pool_ages, max(1, val_size), cfg.seed)
    val_idx = _val_set(data.pool_ages, val_idx, dist, target_ages, cfg.seed)
  items = train_idx[draw_training_set(data.pool_ages[train_idx], dist, target_ages, cfg.seed)]
  return _StageData(data, data_cfg, dist, train_idx, val_idx, items)


def checkpoint_dir(entry: Mapping[str, Any], workdir: str, out: str) -> str:
  """Where a stage's checkpoints live while it trains: workdir/ckpt/NAME/pretrain-HASH (removed once saved)."""
  return os.path.join(workdir, "ckpt", entry["name"], "pretrain-" + os.path.basename(out).rsplit("-", 1)[-1])


def _train_stage(entry: Mapping[str, Any], cfg: Any, fcfg: fit_lib.FitConfig, workdir: str, base: Any,
                 sd: _StageData, checkpoint: FitCheckpointing | None) -> tuple[fit_lib.FitResult, float]:
  """(the fitted prior, its source test MAE): `fit` on the source's host images (it keeps them on the device or
  reads them through Grain, by memory), logging to the prior's TensorBoard run, resuming from `checkpoint`."""
  name, p = entry["name"], entry["pretrain"]
  mode = stage_fields(p)["mode"]
  params = base.variables["params"]
  optimizer = fit_lib.optimizer_for(ml_collections.ConfigDict(_plain(p.get("optim", cfg.optim))), params, mode)
  state = step_lib.init_state({**base.variables, "params": jax.tree.map(jnp.asarray, params)}, optimizer, cfg.seed)
  data, val_idx = sd.data, sd.val_idx
  board = Logger(os.path.join(workdir, "tb", name), enabled=jax.process_index() == 0)  # the prior's run
  on_losses, on_eval = fit_logging(board, "pretrain", f"the pre-training stage of prior {name}")
  try:
    result = fit_lib.fit(base.model, base.head_kind(), base.preprocess, optimizer, state, fcfg, mode,
                         data.pool_images, data.pool_ages, sd.items,
                         data.pool_images[val_idx] if len(val_idx) else None,
                         data.pool_ages[val_idx] if len(val_idx) else None, seed=cfg.seed,
                         progress=cfg.progress, desc=f"pretrain {name}", on_eval=on_eval,
                         on_losses=on_losses, checkpoint=checkpoint)
    predict = jax.jit(step_lib.make_predict(base.model, base.head_kind(), base.preprocess))
    test_pred = step_lib.predict_padded(functools.partial(predict, result.params, result.batch_stats),
                                        jnp.asarray(data.test_images), int(cfg.eval_batch_size),
                                        cfg.data.crop)
    source_mae = metrics_lib.mae(test_pred, data.test_ages)
    board.scalar("pretrain/source_test_mae", source_mae, result.steps_run, f"Test MAE (years) on the source data "
                 f"of the pre-training stage of prior {name}, at its best state. Step = optimiser steps run.")
  finally:
    board.close()
  return result, source_mae


def _stage_record(entry: Mapping[str, Any], out: str, sd: _StageData, result: fit_lib.FitResult, source_mae: float,
                  target_ages: np.ndarray | None) -> dict[str, Any]:
  """What `pretrain_stage.json` records of a finished stage."""
  ages, items, train_idx = sd.data.pool_ages, sd.items, sd.train_idx
  return {"name": entry["name"], "stage": os.path.basename(out), "definition": _plain(entry),
          "mode": (sd.dist or {}).get("mode", "original"), "samples": int(len(items)),
          "distinct_samples": int(len(np.unique(items))), "source_pool": int(len(train_idx)),
          "val_images": int(len(sd.val_idx)), "steps_run": result.steps_run, "best_step": result.best_step,
          "best_val_mae": result.best_val_mae, "stopped_early": result.stopped_early,
          "wall_s": round(result.wall_s, 2), "loader": result.loader,
          "source_test_mae": source_mae, "history": result.history,
          "histograms": {"source": age_histogram(ages[train_idx]).tolist(),
                         "resampled": age_histogram(ages[items]).tolist(),
                         **({"target": age_histogram(target_ages).tolist()} if target_ages is not None else {})}}


def _save_stage(out: str, stage: dict[str, Any], base: Any, sd: _StageData, result: fit_lib.FitResult) -> None:
  """Writes the prior directory and its stage record (process 0: every process trained the same prior)."""
  if jax.process_index() != 0:
    return
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, STAGE_FILE), "w") as f:
    json.dump(stage, f, indent=1, default=float)
  variables = {"params": result.params, **({"batch_stats": result.batch_stats} if result.batch_stats else {})}
  save_pretrained(out, base.spec, variables, base.preprocess,
                  source={"format": "agejax-pretrain", "stage": os.path.basename(out), "steps": result.steps_run,
                          "source_images": int(len(sd.items)), "source_test_mae": stage["source_test_mae"],
                          "definition": stage["definition"]},
                  training_data={"name": sd.data_cfg["name"], "synthetic": sd.data_cfg["name"] == "synthetic"})


def pretrain_prior(entry: Mapping[str, Any], cfg: Any, workdir: str, target_ages: np.ndarray | None = None) -> str:
  """Runs (or reuses) the pre-training stage of a prior entry; returns its prior directory.

  An interrupted stage (SIGTERM: `Preempted`, or a crash) resumes from its latest checkpoint under
  workdir/ckpt/NAME/ (config.checkpoint: enabled, every_steps, keep, async_save) and ends with the prior an
  uninterrupted run makes; the checkpoints are removed once the prior is saved."""
  from agejax.experiments.priors import resolve_prior

  name = entry["name"]
  out = stage_dir(entry, cfg, workdir, target_ages)
  # With several processes, process 0 decides, so that every process trains (or reuses) alike.
  if sharding_lib.same_choice(str(os.path.exists(os.path.join(out, METADATA_FILE))), ("False", "True")) == "True":
    log.info("prior %s: reusing pre-training stage %s", name, out)
    return out
  fcfg = _fit_config(entry["pretrain"], cfg)
  _check_source(name, {**_plain(cfg.data), **_plain(entry["pretrain"]["data"])})
  base = resolve_prior(_start(entry, cfg, workdir, target_ages), cfg.model, cfg.data.crop, cfg.seed)
  sd = _stage_data(entry, cfg, target_ages)
  ckpt_cfg = checkpoint_lib.CheckpointConfig.from_config(cfg)
  ckpt_dir = checkpoint_dir(entry, workdir, out)
  checkpoint = FitCheckpointing(ckpt_dir, ckpt_cfg, {"stage": os.path.basename(out)}) if ckpt_cfg.enabled else None
  result, source_mae = _train_stage(entry, cfg, fcfg, workdir, base, sd, checkpoint)
  log.info("prior %s: pre-trained %d steps (best at %d%s) on %d samples of %d source images (%s), source test MAE "
           "%.3f", name, result.steps_run, result.best_step, ", stopped early" if result.stopped_early else "",
           len(sd.items), len(sd.train_idx), (sd.dist or {}).get("mode", "original"), source_mae)
  _save_stage(out, _stage_record(entry, out, sd, result, source_mae, target_ages), base, sd, result)
  sharding_lib.barrier(f"pretrain:{os.path.basename(out)}")
  if checkpoint is not None:
    checkpoint_lib.remove_checkpoints(ckpt_dir)
  return out
