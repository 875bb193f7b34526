"""The study under jax.distributed: two loopback processes through launch/local.sh (gloo CPU collectives),
one CPU device each, give the results of one process; only process 0 writes outputs."""

import socket
import subprocess

from scaleout import REPO, assert_same_results, env, parse_probe, results, study_cmd


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tiny_reference, tmp_path):
  workdir, logs = tmp_path / "w", tmp_path / "logs"
  cmd = ["bash", str(REPO / "launch/local.sh"), "-n", "2", "--cpu-devices", "1", "--port", str(_free_port()),
         "--logdir", str(logs), "--", *study_cmd(workdir, "--config.checkpoint.every_chunks=3", probe=True)]
  proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:] + (logs / "process_1.log").read_text()[-3000:]
  probe = parse_probe((logs / "process_0.log").read_text())
  assert (probe["processes"], probe["devices"]) == (2, 2)
  # Groups of 2 trials, one per process (the last group padded from 1 to 2): one program for both sizes.
  group = probe["groups"]["3"]
  assert group["spec"] == "P('trial',)" and group["devices"] == 2 and group["shard_rows"] == [1]
  assert probe["traces"] == {"vmap,2": 1}
  assert "PROBE" not in (logs / "process_1.log").read_text()
  assert_same_results(results(workdir), results(tiny_reference[0]), exact=False)
  assert (workdir / "checkpoints" / "scratch" / "n00003_best").is_dir() and not (workdir / "ckpt").exists()
