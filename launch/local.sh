#!/usr/bin/env bash
# Runs N cooperating JAX processes on this machine (loopback coordinator), one log per process.
#
#   launch/local.sh -n N [--port P] [--cpu-devices K] [--logdir DIR] -- COMMAND...
#
# Each process gets AGEJAX_COORDINATOR=127.0.0.1:P, AGEJAX_NUM_PROCESSES=N and AGEJAX_PROCESS_ID=i, which
# agejax.parallel.maybe_initialize() reads. --cpu-devices K also sets JAX_PLATFORMS=cpu and AGEJAX_CPU_DEVICES=K
# (K fake CPU devices per process). Process 0's log is echoed live. If one process fails the others are
# stopped; the exit status is 0 only if all succeeded.
set -euo pipefail

usage() {
  sed -n '2,10s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

num=""
port=""
cpu_devices=""
logdir="logs/local"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --num-processes) num="${2:?-n needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --cpu-devices) cpu_devices="${2:?--cpu-devices needs a value}"; shift 2 ;;
    --logdir) logdir="${2:?--logdir needs a value}"; shift 2 ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option '$1' (the command goes after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "local.sh: no command given after --" >&2; usage; }
[[ "$num" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -n must be a positive integer, got '$num'" >&2; usage; }
if [[ -n "$cpu_devices" && ! "$cpu_devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --cpu-devices must be a positive integer, got '$cpu_devices'" >&2
  usage
fi
if [[ -z "$port" ]]; then
  # Ask the kernel for a free port; fall back to a random high one.
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
    2>/dev/null || echo $((20000 + RANDOM % 20000)))"
fi

mkdir -p "$logdir"
export AGEJAX_COORDINATOR="127.0.0.1:$port"
export AGEJAX_NUM_PROCESSES="$num"
if [[ -n "$cpu_devices" ]]; then
  export JAX_PLATFORMS=cpu
  export AGEJAX_CPU_DEVICES="$cpu_devices"
fi

# Job control puts each process in its own process group, so stopping it also stops whatever it started.
set -m
pids=()
tail_pid=""
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
}
cleanup() {
  stop_all
  [[ -z "$tail_pid" ]] || kill "$tail_pid" 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo "local.sh: interrupted, stopping all processes" >&2; exit 130' INT TERM

echo "local.sh: $num processes, coordinator $AGEJAX_COORDINATOR, logs in $logdir/process_*.log" >&2
for ((i = 0; i < num; i++)); do
  AGEJAX_PROCESS_ID="$i" "$@" >"$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -f "$logdir/process_0.log" &
tail_pid=$!

# Poll rather than `wait -n` so the index of the process that ended is known.
status=()
running=$num
failed=""
while [[ $running -gt 0 ]]; do
  for ((i = 0; i < num; i++)); do
    [[ -z "${status[i]:-}" ]] || continue
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      rc=0
      wait "${pids[i]}" || rc=$?
      status[i]=$rc
      running=$((running - 1))
      if [[ $rc -ne 0 && -z "$failed" ]]; then
        failed=$i
        echo "local.sh: process $i exited with status $rc; stopping the others. Last lines of its log:" >&2
        tail -n 20 "$logdir/process_$i.log" >&2
        stop_all
      fi
    fi
  done
  [[ $running -eq 0 ]] || sleep 0.2
done
sleep 0.3  # let tail print the end of process 0's log

for ((i = 0; i < num; i++)); do
  echo "local.sh: process $i exit status ${status[i]}" >&2
done
[[ -z "$failed" ]] || exit 1
