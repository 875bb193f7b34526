"""A workdir's identity: the config fields that define its results, checked before a rerun adds to them.

A learning-curve workdir keeps `config.json` beside `results.csv`. A rerun with the same defining fields skips
the (prior, size) pairs already there and resumes an interrupted size; a rerun whose defining fields differ
would mix two studies in one table, so it stops with a one-line error naming the fields, unless
`config.overwrite=True` (then the old results, splits and checkpoints are removed first). Fields that change how
a run is carried out but not its numbers (progress bars, devices, checkpoint cadence, strategy, reports) are
not part of the fingerprint.
"""

import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

from agejax.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Top-level sections / fields that do not change a run's numbers.
NOT_DEFINING = ("title", "progress", "overwrite", "checkpoint", "mesh", "eval_batch_size", "log_trial_losses",
                "diagnostics", "diagnostics_options", "save_trials", "keep_states_mb")
NOT_DEFINING_NESTED = ("data.cache_dir", "trials.parallel", "trials.trial_chunk", "trials.auto_candidates",
                       "trials.memory_budget_gb", "trials.conv_plan")
# What a rerun removes with overwrite=True (everything the results depend on).
RESULT_OUTPUTS = ("results.csv", "table.md", "learning_curve.png", "splits", "checkpoints", "ckpt", "tb",
                  "diagnostics", "conv_plan.json", "data_report.json", "data_info.json")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  if isinstance(tree, (list, tuple)):
    return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}
  return {prefix[:-1]: tree}


def fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
  """The defining fields of a config (or of a saved config.json), flattened to 'a.b' keys."""
  plain = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config), default=str))
  flat = _flat({k: v for k, v in plain.items() if k not in NOT_DEFINING})
  return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NOT_DEFINING_NESTED)}


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'field (old -> new)' for every defining field whose value differs."""
  a, b = fingerprint(old), fingerprint(new)
  out = []
  for key in sorted(set(a) | set(b)):
    if key not in a or key not in b or a[key] != b[key]:
      out.append(f"{key} ({_short(a, key)} -> {_short(b, key)})")
  return out


def _short(fields: Mapping[str, Any], key: str) -> str:
  if key not in fields:
    return "<unset>"
  text = json.dumps(fields[key], default=str)
  return text if len(text) <= 40 else text[:37] + "..."


def prepare_workdir(workdir: str, config: Any, results_file: str = "results.csv") -> bool:
  """Checks `workdir` against `config` before a run writes anything; True when it holds earlier results of the
  same study (a rerun). Raises ConfigError naming the differing fields; `config.overwrite` clears them instead."""
  saved = os.path.join(workdir, CONFIG_FILE)
  if not (os.path.exists(os.path.join(workdir, results_file)) and os.path.exists(saved)):
    return False
  with open(saved) as f:
    old = json.load(f)
  diff = differing_fields(old, config)
  if not diff:
    return True
  if config.get("overwrite", False):
    log.warning("workdir %s: overwrite=True, removing the results of another config (%s)", workdir,
                "; ".join(diff[:5]))
    for name in RESULT_OUTPUTS:
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    return False
  more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
  raise ConfigError(f"{workdir} holds results of another config: {'; '.join(diff[:5])}{more}; use a new --workdir, "
                    "or --config.overwrite=True to replace them")
