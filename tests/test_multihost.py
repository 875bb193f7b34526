"""The study under jax.distributed: two loopback processes through launch/local.sh (gloo CPU collectives),
one CPU device each, give the results of one process; only process 0 writes outputs."""

import socket
import subprocess

from scaleout import REPO, assert_same_results, env, parse_probe, results, study_cmd


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _all_lax_plan(path) -> int:
  """A convolution plan naming 'lax' for every layer of the tiny study's network; returns its size."""
  import jax
  import jax.numpy as jnp

  from agejax.configs import tiny_vgg
  from agejax.engine import autotune
  from agejax.models import build_model

  model = build_model(dict(tiny_vgg(width=1 / 32, fc_dim=16, conv_impl="auto"), head="regression"))
  x = jnp.zeros((10, 32, 32, 3))  # the study's batch of 10 crops of 32 px
  sigs = autotune.model_signatures(model, model.init(jax.random.key(0), x), x.shape)
  autotune.write_plan_file(str(path), dict.fromkeys(sigs, "lax"))
  return len(sigs)


def test_two_processes_match_one(tiny_reference, tmp_path):
  workdir, logs = tmp_path / "w", tmp_path / "logs"
  # 'auto' convolutions: process 0 follows the plan file and process 1, which does not read it, must take
  # process 0's choices ('lax' everywhere, as in the one-process reference) rather than its fallback.
  layers = _all_lax_plan(tmp_path / "plan.json")
  cmd = ["bash", str(REPO / "launch/local.sh"), "-n", "2", "--cpu-devices", "1", "--port", str(_free_port()),
         "--logdir", str(logs), "--", *study_cmd(workdir, "--config.checkpoint.every_chunks=3",
                                                 "--config.trials.conv_impl=auto",
                                                 f"--config.trials.conv_plan={tmp_path / 'plan.json'}", probe=True)]
  proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:] + (logs / "process_1.log").read_text()[-3000:]
  probe = parse_probe((logs / "process_0.log").read_text())
  assert (probe["processes"], probe["devices"]) == (2, 2)
  # Groups of 2 trials, one per process (the last group padded from 1 to 2): one program for both sizes.
  group = probe["groups"]["3"]
  assert group["spec"] == "P('trial',)" and group["devices"] == 2 and group["shard_rows"] == [1]
  assert probe["traces"] == {"vmap,2": 1}
  assert "PROBE" not in (logs / "process_1.log").read_text()
  for log in ("process_0.log", "process_1.log"):
    assert f"convolution plan {{'lax': {layers}}}" in (logs / log).read_text(), log
  assert_same_results(results(workdir), results(tiny_reference[0]), exact=False)
  assert (workdir / "checkpoints" / "scratch" / "n00003_best").is_dir() and not (workdir / "ckpt").exists()
