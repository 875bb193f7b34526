"""A workdir's identity: the config fields that define its results, checked before a rerun adds to them.

A learning-curve workdir keeps `config.json` beside `results.csv`. A rerun with the same defining fields skips
the (prior, size) pairs already there and resumes an interrupted size; a rerun whose defining fields differ
would mix two studies in one table, so it stops with a one-line error naming the fields, unless
`config.overwrite=True` (then the old results, splits and checkpoints are removed first). Fields that change how
a run is carried out but not its numbers (progress bars, devices, checkpoint cadence, strategy, reports) are
not part of the fingerprint.

The workdir's inputs are written here too, by every study: config.json (`write_config`), data_info.json and
data_report.json (`write_data_files`), the fixed test list splits/test.txt (`write_test_split`) and each
trial's training list splits/PRIOR/nNNNNN/trialTT.txt (`write_trial_split`, text from agejax.experiments.plan).
"""

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
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


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any],
                     defaults: Mapping[str, Any] | None = None) -> list[str]:
  """'field (old -> new)' for every defining field whose value differs; a field of `new` that `old` lacks takes
  its value in `defaults` (a config.json written before the field was declared ran with its default)."""
  a, b, declared = fingerprint(old), fingerprint(new), fingerprint(defaults or {})
  a |= {k: declared[k] for k in b.keys() - a.keys() if k in declared}
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
  from agejax.configs import base_config

  with open(saved) as f:
    old = json.load(f)
  diff = differing_fields(old, config, base_config())
  if not diff:
    return True
  if config.overwrite:
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


# -- the workdir's inputs -----------------------------------------------------------------------------------
DATA_INFO_FILE = "data_info.json"
DATA_REPORT_FILE = "data_report.json"
SPLITS_DIR = "splits"


def write_config(workdir: str, config: Any) -> str:
  """Writes workdir/config.json (a ConfigDict's best-effort JSON, else `json.dumps` of a mapping); its path."""
  path = os.path.join(workdir, CONFIG_FILE)
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(config))
  return path


def write_data_files(workdir: str, rejections: Any, info: Mapping[str, Any]) -> None:
  """Writes workdir/data_report.json (`rejections.write`: agejax.data.records.Rejections) and data_info.json."""
  os.makedirs(workdir, exist_ok=True)
  rejections.write(os.path.join(workdir, DATA_REPORT_FILE))
  with open(os.path.join(workdir, DATA_INFO_FILE), "w") as f:
    json.dump(dict(info), f, indent=2, default=str)


def split_lines(names: Iterable[str], ages: Iterable[float]) -> str:
  """One `name<TAB>age` line per image, the age in %g (a split list's body)."""
  return "".join(f"{name}\t{float(age):g}\n" for name, age in zip(names, ages, strict=True))


def write_test_split(workdir: str, names: list[str], ages: Iterable[float]) -> str:
  """Writes splits/test.txt, the learning curve's fixed test set (a '#' count line, then `split_lines`)."""
  path = os.path.join(workdir, SPLITS_DIR, "test.txt")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(f"# fixed test set: {len(names)} images\n" + split_lines(names, ages))
  return path


def trial_split_file(prior: str, n: int, trial: int) -> str:
  """A trial's training list, relative to the workdir (results.csv's `split_file`)."""
  return os.path.join(SPLITS_DIR, prior, f"n{n:05d}", f"trial{trial:02d}.txt")


def write_trial_split(workdir: str, prior: str, n: int, trial: int, text: str) -> str:
  """Writes a trial's training list (`text`: agejax.experiments.plan.TrialRecord.split_text); its relative path."""
  rel = trial_split_file(prior, n, trial)
  path = os.path.join(workdir, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return rel
