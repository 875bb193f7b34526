"""Pre-training stages: train a prior on a source dataset, optionally resampled to an age distribution.

A prior entry with a `pretrain` section is produced by this stage before the learning curve runs:
  pretrain.data          the source (a `config.data`-like section; resize/crop come from config.data);
  pretrain.steps         optimiser steps; pretrain.batch_size; pretrain.optim (like config.optim);
  pretrain.distribution  optional {mode: 'uniform'|'matched'|'original', total: int, target: 'study'}:
                         resample the source (paper eq. 2-3) before training; 'matched' uses the study's
                         training pool as the target distribution.
The result is a prior directory under workdir/priors/, named by a hash of everything that defines it;
a later run with the same definition reuses it instead of training again.
"""

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

from agejax.engine import metrics as metrics_lib
from agejax.engine import trials as trials_lib
from agejax.models.pretrained import METADATA_FILE, save_pretrained

log = logging.getLogger(__name__)


def stage_key(entry: Mapping[str, Any], cfg: Any) -> str:
  blob = json.dumps({"entry": _plain(entry), "model": _plain(cfg.model), "resize": cfg.data.resize,
                     "crop": cfg.data.crop, "seed": cfg.seed}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _plain(x: Any) -> Any:
  if isinstance(x, ml_collections.ConfigDict):
    return x.to_dict()
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def pretrain_prior(entry: Mapping[str, Any], cfg: Any, workdir: str, target_ages: np.ndarray | None = None) -> str:
  """Runs (or reuses) the pre-training stage of a prior entry; returns its prior directory."""
  from agejax.data.distribution import resample_indices
  from agejax.experiments.learning_curve import PriorEngine
  from agejax.experiments.priors import resolve_prior
  from agejax.experiments.study_data import load_study_data

  name = entry["name"]
  out = os.path.join(workdir, "priors", f"{name}-{stage_key(entry, cfg)}")
  if os.path.exists(os.path.join(out, METADATA_FILE)):
    log.info("prior %s: reusing pre-training stage %s", name, out)
    return out
  p = entry["pretrain"]
  start = {k: v for k, v in entry.items() if k not in ("pretrain", "head")}
  start["head"] = p.get("head", "new")
  base = resolve_prior(start, cfg.model, cfg.data.crop, cfg.seed)
  data_cfg = {**_plain(cfg.data), **_plain(p["data"])}
  data = load_study_data(data_cfg, cfg.seed + 1000)
  items = np.arange(len(data.pool_ages))
  dist = p.get("distribution")
  if dist and dist.get("mode", "original") != "original" or (dist and dist.get("total")):
    target = target_ages if dist.get("mode") == "matched" else None
    items = resample_indices(data.pool_ages, dist.get("mode", "original"), int(dist.get("total") or len(items)),
                             target_ages=target, seed=cfg.seed)
  sub = ml_collections.ConfigDict(_plain(cfg))
  sub.optim = ml_collections.ConfigDict(_plain(p.get("optim", cfg.optim)))
  sub.batch_size = p.get("batch_size", cfg.batch_size)
  steps = int(p["steps"])
  chunk = min(steps, int(p.get("chunk_steps", 100)))
  engine = PriorEngine(sub, base, chunk)
  runner = engine.runner("loop")
  padded = -(-steps // chunk) * chunk
  order = trials_lib.sample_order(items, padded, sub.batch_size, cfg.seed)
  hyper = trials_lib.Hyper(jnp.asarray(p.get("stepsize", steps), jnp.int32), jnp.asarray(steps, jnp.int32))
  pool_images, pool_ages = jnp.asarray(data.pool_images), jnp.asarray(data.pool_ages)
  state = runner.group([engine.initial_state(cfg.seed)])
  for step0 in range(0, steps, chunk):
    state, losses = runner.train(state, order[step0:step0 + chunk], step0, hyper, pool_images, pool_ages)
    valid = losses[:, : steps - step0]
    if not np.isfinite(valid).all():
      from agejax.errors import TrainingError
      raise TrainingError(f"pre-training of prior {name!r} diverged near step {step0}: lower pretrain.optim.base_lr")
  preds = trials_lib.evaluate(runner, state, jnp.asarray(data.test_images), cfg.data.crop,
                              cfg.get("eval_batch_size", 64))
  source_mae = metrics_lib.mae(preds[0], data.test_ages)
  log.info("prior %s: pre-trained %d steps on %d source images (%s), source test MAE %.3f", name, steps, len(items),
           (dist or {}).get("mode", "original"), source_mae)
  variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
  save_pretrained(out, base.spec, jax.device_get(variables), base.preprocess,
                  source={"format": "agejax-pretrain", "stage": stage_key(entry, cfg), "steps": steps,
                          "source_images": int(len(items)), "source_test_mae": source_mae,
                          "definition": _plain(entry)})
  return out
