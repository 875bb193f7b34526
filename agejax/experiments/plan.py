"""A learning-curve study's plan, in numpy only (no JAX): its sizes, and for each size every trial's seed,
training subset, sample order and training list.

`size_schedule` turns `config.sizes` rows into `SizePlan`s; `UNTOUCHED` stands for size 0 (the prior evaluated
without fine-tuning). `trial_records` draws a whole size: trial t has seed `trial_seed(base_seed, t)`, n base
images drawn without replacement (`draw_subset`, all of each base's pool items) and a Caffe-style sample order
(`agejax.engine.orders.sample_order`) padded to whole chunks. The draws depend only on (seed, n, pool), so a
rerun, a resumed size or another process draws the same records.
"""

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from agejax.engine.orders import sample_order
from agejax.reports.workdir import split_lines

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SizePlan:
  """One training-set size: n base images, `trials` trials, the step schedule (stepsize, max_iter)."""

  n: int
  trials: int
  stepsize: int
  max_iter: int

  @property
  def untouched(self) -> bool:
    """Size 0: the prior evaluated as it is (no training, no subset)."""
    return self.n == 0

  def as_dict(self) -> dict[str, int]:
    """{n, trials, stepsize, max_iter} (a checkpoint fingerprint's size fields)."""
    return dataclasses.asdict(self)


UNTOUCHED = SizePlan(n=0, trials=0, stepsize=0, max_iter=0)


def size_schedule(rows: Iterable[Sequence[Any]], num_bases: int, steps_scale: float = 1.0,
                  min_steps: int = 1) -> list[SizePlan]:
  """SizePlans from `config.sizes` rows (n, trials, stepsize, max_iter).

  A float n <= 1.0 is a fraction of the pool; n is capped by the pool (with a warning) and sizes below 1 are
  dropped. `steps_scale` multiplies stepsize and max_iter (a runlocal switch), max_iter never below `min_steps`.
  """
  out, scale = [], float(steps_scale)
  for n, trials, stepsize, max_iter in rows:
    n = int(round(n * num_bases)) if isinstance(n, float) and n <= 1.0 else int(n)
    if n > num_bases:
      log.warning("size %d exceeds the pool (%d base images): capped", n, num_bases)
      n = num_bases
    if n < 1:
      continue
    out.append(SizePlan(n, int(trials), max(int(round(stepsize * scale)), 1),
                        max(int(round(max_iter * scale)), int(min_steps))))
  return out


def pending_sizes(sizes: Sequence[SizePlan], done: Iterable[int], size_zero: bool = True) -> list[SizePlan]:
  """The sizes of one prior still to run: UNTOUCHED first (when `size_zero`), then `sizes`, less the n in `done`."""
  done = set(done)
  return [s for s in ([UNTOUCHED] if size_zero else []) + list(sizes) if s.n not in done]


def study_chunk_steps(sizes: Sequence[SizePlan], chunk_steps: int = 50) -> int:
  """One chunk length for the whole study (so one compiled program serves every size): at most any max_iter."""
  return max(1, min([int(chunk_steps)] + [s.max_iter for s in sizes]))


def padded_steps(max_iter: int, chunk_steps: int) -> int:
  """max_iter rounded up to whole chunks (the length of a trial's sample order)."""
  return -(-max_iter // chunk_steps) * chunk_steps


def trial_seed(base_seed: int, trial: int) -> int:
  """Seed of trial `trial`: a lone run with `seed=s` and one trial reproduces trial s - base_seed."""
  return int(base_seed) + int(trial)


def draw_subset(num_bases: int, group_members: Sequence[np.ndarray], n: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(base ids, pool item indices) of n base images drawn without replacement; `group_members[b]` are base b's
  pool items (StudyData.group_members())."""
  rng = np.random.default_rng([seed, n])
  bases = np.sort(rng.choice(num_bases, size=n, replace=False))
  items = np.concatenate([group_members[b] for b in bases])
  return bases, items


def base_ages(pool_groups: np.ndarray, pool_ages: np.ndarray) -> dict[int, float]:
  """Base id -> age (a base's items share it; the last item's wins), as the training lists write it."""
  return {int(g): float(a) for g, a in zip(pool_groups, pool_ages)}


@dataclasses.dataclass(frozen=True, eq=False)
class TrialRecord:
  """One trial of a size: its seed, drawn bases and pool items, sample order (padded_steps, batch) and the text
  of its training list (reports.workdir.write_trial_split writes it)."""

  trial: int
  seed: int
  bases: np.ndarray
  items: np.ndarray
  order: np.ndarray
  split_text: str


def split_text(prior: str, n: int, trial: int, seed: int, names: Sequence[str], ages: Sequence[float]) -> str:
  """A trial's training list: a '#' line naming the trial, then one `name<TAB>age` line per base image."""
  return f"# prior={prior} n_train={n} trial={trial} seed={seed}\n" + split_lines(names, ages)


def trial_records(size: SizePlan, base_seed: int, group_members: Sequence[np.ndarray], names: Sequence[str],
                  ages: Mapping[int, float] | Sequence[float], batch_size: int, chunk_steps: int,
                  prior: str) -> list[TrialRecord]:
  """Every trial of `size` (none for UNTOUCHED). `names[b]` / `ages[b]`: base b's name and age (StudyData.pool_names,
  `base_ages`); orders run `padded_steps(size.max_iter, chunk_steps)` steps of `batch_size`."""
  steps = padded_steps(size.max_iter, chunk_steps)
  out = []
  for t in range(size.trials):
    seed = trial_seed(base_seed, t)
    bases, items = draw_subset(len(group_members), group_members, size.n, seed)
    text = split_text(prior, size.n, t, seed, [names[b] for b in bases], [ages[int(b)] for b in bases])
    out.append(TrialRecord(t, seed, bases, items, sample_order(items, steps, batch_size, seed), text))
  return out


def stack_orders(records: Sequence[TrialRecord]) -> np.ndarray:
  """(trials, steps, batch) sample orders of a size's records."""
  return np.stack([r.order for r in records])
