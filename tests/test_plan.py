"""A study's plan (agejax.experiments.plan): numpy only, and byte-identical to the draws the studies have made."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from agejax.experiments import plan
from agejax.reports import workdir as workdir_lib

# (config.sizes, seed, batch_size, chunk_steps, steps_scale, min_steps) and the sha256 of every size's draws,
# recorded from the learning curve's own size_schedule / draw_subset / sample_order / write_splits (issue 14).
GOLDEN = [
    (((3, 2, 5, 12), (0.5, 3, 4, 7), (40, 1, 3, 9)), 0, 4, 5, 1.0, 1,
     "2ab82e4f499b9c04b8cff4a03de75151b560237e9d6ff90b99075d33c1771e3e"),
    (((1, 4, 2, 3), (1.0, 2, 6, 20), (0.01, 2, 1, 1)), 7, 8, 50, 0.5, 4,
     "26b0ef3d4c686d115efa7a503b6515f96bd313428544afcd241938dcf5ba9485"),
]


def _pool(num_bases: int = 13, rotations: int = 3, seed: int = 0) -> dict:
  """A pool of `rotations` items per base, its items shuffled, one float32 age per base."""
  rng = np.random.default_rng(seed)
  groups = rng.permutation(np.repeat(np.arange(num_bases), rotations))
  ages = np.round(rng.uniform(1, 90, num_bases), 1).astype(np.float32)
  order = np.argsort(groups, kind="stable")  # StudyData.group_members
  bounds = np.searchsorted(groups[order], np.arange(num_bases + 1))
  return dict(groups=groups, ages=ages[groups], names=[f"face_{b:03d}.jpg" for b in range(num_bases)],
              members=[order[bounds[i]:bounds[i + 1]] for i in range(num_bases)])


def _digest(sizes, pool, seed, batch, chunk, tmp_path) -> str:
  """The sha256 the golden values were recorded with: size fields, bases, items, split file path and bytes, orders."""
  h = hashlib.sha256()
  for size in sizes:
    records = plan.trial_records(size, seed, pool["members"], pool["names"], plan.base_ages(pool["groups"],
                                 pool["ages"]), batch, chunk, "p")
    h.update(repr(size.as_dict()).encode())
    for r in records:
      rel = workdir_lib.write_trial_split(str(tmp_path), "p", size.n, r.trial, r.split_text)
      h.update(r.bases.astype(np.int64).tobytes())
      h.update(r.items.astype(np.int64).tobytes())
      h.update(rel.encode())
      h.update((tmp_path / rel).read_bytes())
    h.update(plan.stack_orders(records).tobytes())
  return h.hexdigest()


def test_import_needs_no_jax():
  code = ("import sys, agejax.experiments.plan; heavy = [m for m in ('jax', 'flax', 'optax') if m in sys.modules]; "
          "assert not heavy, heavy")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})


@pytest.mark.parametrize("case", GOLDEN)
def test_draws_match_the_recorded_ones(case, tmp_path):
  rows, seed, batch, chunk, scale, min_steps, digest = case
  sizes = plan.size_schedule(rows, 13, scale, min_steps)
  assert _digest(sizes, _pool(), seed, batch, chunk, tmp_path) == digest


def test_size_schedule_fractions_caps_and_scaled_steps(caplog):
  rows = ((0.5, 3, 4, 7), (1.0, 2, 10, 20), (1, 4, 2, 3), (40, 1, 3, 9), (0.01, 2, 1, 1))
  with caplog.at_level("WARNING"):
    sizes = plan.size_schedule(rows, 13, steps_scale=0.5, min_steps=4)
  assert [s.n for s in sizes] == [6, 13, 1, 13]  # round(6.5) = 6; int 1 is 1 image, float 1.0 the pool; 0.13 drops
  assert sizes[1] == plan.SizePlan(13, 2, 5, 10) and sizes[2] == plan.SizePlan(1, 4, 1, 4)  # floors: 1 and min_steps
  assert "size 40 exceeds the pool (13 base images): capped" in caplog.text
  assert plan.size_schedule(((3, 2, 5, 12),), 13) == [plan.SizePlan(3, 2, 5, 12)]


def test_size_zero_is_a_size_plan_not_an_int():
  assert isinstance(plan.UNTOUCHED, plan.SizePlan) and plan.UNTOUCHED.untouched and plan.UNTOUCHED != 0
  sizes = plan.size_schedule(((3, 2, 5, 12), (5, 1, 2, 8)), 13)
  assert not any(s.untouched for s in sizes)
  assert plan.pending_sizes(sizes, done=[]) == [plan.UNTOUCHED, *sizes]
  assert plan.pending_sizes(sizes, done=[0, 5]) == sizes[:1]
  assert plan.pending_sizes(sizes, done=[], size_zero=False) == sizes
  assert plan.trial_records(plan.UNTOUCHED, 0, _pool()["members"], _pool()["names"], {}, 4, 5, "p") == []
  assert plan.SizePlan(3, 2, 5, 12).as_dict() == {"n": 3, "trials": 2, "stepsize": 5, "max_iter": 12}


def test_chunks_and_padded_orders():
  sizes = plan.size_schedule(((3, 2, 5, 12), (5, 1, 2, 8)), 13)
  assert plan.study_chunk_steps(sizes, 50) == 8 and plan.study_chunk_steps(sizes, 5) == 5
  assert plan.study_chunk_steps([], 0) == 1
  assert [plan.padded_steps(m, 5) for m in (1, 5, 12)] == [5, 5, 15]
  pool = _pool()
  records = plan.trial_records(sizes[0], 10, pool["members"], pool["names"], plan.base_ages(pool["groups"],
                               pool["ages"]), 4, 5, "dex")
  assert [(r.trial, r.seed) for r in records] == [(0, 10), (1, 11)]
  for r in records:
    assert len(r.bases) == 3 and np.all(np.diff(r.bases) > 0) and len(r.items) == 9  # 3 bases x 3 rotations
    assert set(pool["groups"][r.items]) == set(r.bases) and r.order.shape == (15, 4) and r.order.dtype == np.int32
    assert set(r.order.ravel()) <= set(r.items)
    lines = r.split_text.splitlines()
    assert lines[0] == f"# prior=dex n_train=3 trial={r.trial} seed={r.seed}" and len(lines) == 4
    assert lines[1] == f"face_{r.bases[0]:03d}.jpg\t{float(pool['ages'][r.items[0]]):g}"
  assert not np.array_equal(records[0].bases, records[1].bases)
