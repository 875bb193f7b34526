"""Checkpoints inside a size: kill -9 and SIGTERM mid-size, rerun the same command, same results."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from scaleout import REPO, assert_same_results, env, results, study_cmd

from agejax.engine.checkpoint import EXIT_PREEMPTED, CheckpointConfig
from agejax.errors import AgejaxError

SIZE_DIR = Path("ckpt") / "scratch" / "n00003"


def _committed(workdir: Path) -> list[dict]:
  """Metadata of the committed checkpoints of the first size (uncommitted ones are temporary dirs)."""
  root = workdir / SIZE_DIR
  out = []
  steps = [p for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
  for step in sorted(steps, key=lambda p: int(p.name)):
    meta = step / "meta" / "metadata"
    if (step / "commit_success.txt").exists() and meta.exists():
      out.append(json.loads(meta.read_text()))
  return out


def _start_and_signal(workdir: Path, sig: int, ready, *extra: str) -> subprocess.CompletedProcess:
  """Starts the study, sends `sig` once `ready(committed checkpoints)` holds, waits for it to end."""
  proc = subprocess.Popen(study_cmd(workdir, *extra), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 400
    while not ready(_committed(workdir)):
      assert proc.poll() is None, "the study ended before a checkpoint was saved mid-size"
      assert time.monotonic() < deadline, "no checkpoint in time"
      time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _rerun(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
  proc = subprocess.run(study_cmd(workdir, *extra), cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def test_kill9_then_sigterm_then_resume_gives_identical_results(tiny_reference, tmp_path):
  """One workdir, the same command three times: killed (-9) in the first group of the first size, stopped by
  SIGTERM in its second group, then run to the end."""
  every = "--config.checkpoint.every_chunks=1"
  killed = _start_and_signal(tmp_path, signal.SIGKILL, lambda metas: len(metas) > 0, every)
  assert killed.returncode == -signal.SIGKILL
  assert not (tmp_path / "results.csv").exists()  # killed inside the first size
  assert _committed(tmp_path)[-1]["group"] == 0

  # Resumes inside the first group; SIGTERM once the second group (trial 2) has started.
  stopped = _start_and_signal(tmp_path, signal.SIGTERM, lambda metas: any(m["group"] == 1 for m in metas), every)
  assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-4000:]
  assert "scratch n=3: resuming from checkpoint" in stopped.stderr and "(group 1 of 2" in stopped.stderr
  assert "signal 15 received" in stopped.stderr and "stopped on request at prior 'scratch', size 3" in stopped.stderr
  latest = _committed(tmp_path)[-1]
  assert latest["group"] == 1 and latest["has_state"] and latest["next_step0"] > 0  # saved at a chunk boundary
  staged = tmp_path / "checkpoints" / "scratch" / "n00003_staging"
  assert sorted(p.name for p in staged.iterdir()) == ["trial00", "trial01"]  # the first group's final states

  rerun = _rerun(tmp_path, every)
  assert "resuming from checkpoint" in rerun.stderr and "(group 2 of 2" in rerun.stderr
  assert_same_results(results(tmp_path), results(tiny_reference[0]), exact=True)
  assert not (tmp_path / "ckpt").exists()  # a finished size's checkpoints are deleted
  assert not staged.exists() and (tmp_path / "checkpoints" / "scratch" / "n00003_best").is_dir()


def test_checkpoint_config():
  assert CheckpointConfig.from_config({}) == CheckpointConfig()
  cfg = CheckpointConfig.from_config({"checkpoint": {"every_chunks": 3, "keep": 1, "async_save": False}})
  assert (cfg.every_chunks, cfg.keep, cfg.async_save, cfg.enabled) == (3, 1, False, True)
  with pytest.raises(AgejaxError, match="every_chunks"):
    CheckpointConfig.from_config({"checkpoint": {"every_chunks": 0}})
