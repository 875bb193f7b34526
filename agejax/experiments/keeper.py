"""The final states of a size's trials, kept until its best and median trials are known and saved.

`TrialKeeper` holds each finished trial's variables in host memory up to a budget and stages the rest on disk
as prior directories; at the size's end it saves the picked trials (best, median, or all) as prior directories
under workdir/checkpoints/PRIOR/ (usable by `agejax.predict`) and removes the staging. A checkpoint of an
unfinished size relies on the staged states (`persist`, `adopt`).
"""

import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from agejax.engine import trials as trials_lib
from agejax.experiments.priors import Prior
from agejax.models.pretrained import METADATA_FILE, load_pretrained, save_pretrained


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
    """Saves the picked trials ('best_median' or 'all') as prior directories; their rows get `checkpoint`."""
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
        _, variables, _ = load_pretrained(self.staged[t])
      save_pretrained(out, self.prior.spec, variables, self.prior.preprocess, source=source,
                      training_data=self.training_data)
      rows[t].setdefault("checkpoint", os.path.relpath(out, os.path.dirname(os.path.dirname(self.root))))
    shutil.rmtree(os.path.join(self.root, f"n{n:05d}_staging"), ignore_errors=True)
