"""Engines (agejax.experiments.engines): priors of one spec share one compiled engine and pass their own variables."""

import jax
import numpy as np

from agejax.experiments import engines as engines_lib
from agejax.experiments.priors import resolve_prior
from configs.demo import get_config


def _setup():
  cfg = get_config("quick,tiny")
  cfg.trials.conv_impl = "lax"  # nothing to time
  entry = dict(cfg.priors[0])
  priors = [resolve_prior({**entry, "name": f"p{s}"}, cfg.model, cfg.data.crop, s) for s in (0, 1)]
  return cfg, priors


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_priors_of_one_spec_share_an_engine_and_start_from_their_own_variables(tmp_path):
  cfg, (a, b) = _setup()
  engines = {}
  ta = engines_lib.engine_for(engines, cfg, str(tmp_path), a, 2, 0)
  tb = engines_lib.engine_for(engines, cfg, str(tmp_path), b, 2, 0)
  assert len(engines) == 1 and ta.engine is tb.engine and ta.prior is a and tb.prior is b
  state_b, state_a = tb.initial_state(3), ta.initial_state(3)  # b first: nothing of b stays in the engine
  assert ta.engine.variables is engines_lib.engine_prior(cfg, a).variables  # the first prior's, never swapped
  for trials, state in ((ta, state_a), (tb, state_b)):
    alone = engines_lib.trial_starter(trials.prior, trials.engine.optimizer, cfg.data.crop)(3)
    for got, want in zip(_leaves(state), _leaves(alone), strict=True):
      np.testing.assert_array_equal(got, want)
  backbone = [x for x, y in zip(_leaves(state_a), _leaves(state_b)) if x.shape == y.shape and not np.array_equal(x, y)]
  assert backbone  # the two priors' weights differ, so each start used its own


def test_another_solver_gets_another_engine(tmp_path):
  cfg, (a, _) = _setup()
  engines = {}
  first = engines_lib.engine_for(engines, cfg, str(tmp_path), a, 2, 0)
  other = cfg.copy_and_resolve_references()
  other.optim.base_lr = 0.5
  second = engines_lib.engine_for(engines, other, str(tmp_path), a, 2, 0)
  assert len(engines) == 2 and first.engine is not second.engine
  assert engines_lib.engine_key(cfg, a, None) != engines_lib.engine_key(other, a, None)
