"""Shared by the scale-out tests: the tiny demo study, how to run it in a subprocess, how to compare results."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from agejax.reports.tables import METRIC_FIELDS, read_results

REPO = Path(__file__).resolve().parents[1]
# One prior, two sizes of 3 trials in groups of 2 (so a size has two groups): 8 and 4 chunks of 2 steps.
TINY = ["--config", "configs/demo.py:quick,tiny", "--config.sizes=((3, 3, 4, 16), (6, 3, 4, 8))",
        "--config.trials.trial_chunk=2", "--config.progress=False"]
TIMING_FIELDS = {"wall_s", "train_images_per_s"}
CLOSE_FIELDS = (*METRIC_FIELDS, "train_loss")


def env(**extra: str) -> dict[str, str]:
  """This environment without launch variables (the session's AGEJAX_CACHE kept), CPU only, one CPU device
  unless `extra` says otherwise."""
  out = {k: v for k, v in os.environ.items() if not k.startswith(("AGEJAX_", "SLURM_")) or k == "AGEJAX_CACHE"}
  # Every compiled program goes to the session's disk cache: later runs skip the many small eager compiles.
  out.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", AGEJAX_CACHE_MIN_COMPILE_S="0", AGEJAX_CPU_DEVICES="1")
  out.update(extra)
  return out


def study_cmd(workdir: Path, *extra: str, probe: bool = False) -> list[str]:
  """The CLI (or tests/study_probe.py, which also reports what the engine did) on the tiny study."""
  entry = [str(REPO / "tests" / "study_probe.py")] if probe else ["-m", "agejax.main"]
  return [sys.executable, *entry, *TINY, "--workdir", str(workdir), *extra]


def parse_probe(stdout: str) -> dict:
  line = next(x for x in stdout.splitlines() if x.startswith("PROBE "))
  return json.loads(line[len("PROBE "):])


def run_probe(workdir: Path, *extra: str, timeout: int = 600, **env_extra: str) -> dict:
  proc = subprocess.run(study_cmd(workdir, *extra, probe=True), cwd=REPO, env=env(**env_extra),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return parse_probe(proc.stdout)


def results(workdir: Path) -> list[dict]:
  return read_results(workdir / "results.csv")


def _same(a, b) -> bool:
  both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
  return both_nan or a == b


def assert_same_results(got: list[dict], want: list[dict], exact: bool, ignore: tuple[str, ...] = ()) -> None:
  """Equal rows (timing columns and `ignore` left out); with `exact=False` metrics need only be close (and
  the best/median picks, which a rounding difference could flip, are not compared)."""
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert set(g) == set(w)
    for key in sorted(set(w) - TIMING_FIELDS - set(ignore)):
      if exact or key not in (*CLOSE_FIELDS, "checkpoint"):
        assert _same(g[key], w[key]), (key, g, w)
      elif key != "checkpoint":
        np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-4, err_msg=key)
