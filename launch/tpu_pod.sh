#!/usr/bin/env bash
# Runs one command on every host of a Cloud TPU pod slice, the hosts cooperating as one JAX job.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--remote-dir DIR] [--logdir DIR]
#                     [--setup CMD] [--dry-run] -- COMMAND...
#
# Copies this repository's files (tracked and untracked, not git-ignored) to DIR (default: agejax, under the
# home directory) on all workers, runs --setup there if given (e.g. 'pip install -r requirements.txt'), then
# runs COMMAND in DIR on all workers at once with AGEJAX_DISTRIBUTED=auto, so agejax.parallel.maybe_initialize()
# lets JAX detect the pod. Per-worker logs: LOGDIR/WORKER.log (default logs/tpu-NAME). --dry-run prints the
# commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,11s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

tpu=""
zone=""
project=""
remote_dir="agejax"
logdir=""
setup=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="${2:?--tpu needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --remote-dir) remote_dir="${2:?--remote-dir needs a value}"; shift 2 ;;
    --logdir) logdir="${2:?--logdir needs a value}"; shift 2 ;;
    --setup) setup="${2:?--setup needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option '$1' (the command goes after --)" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "tpu_pod.sh: --tpu and --zone are required" >&2; usage; }
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no command given after --" >&2; usage; }
logdir="${logdir:-logs/tpu-$tpu}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tarball="${TMPDIR:-/tmp}/agejax-$tpu.tar.gz"
remote_tarball="/tmp/agejax-$tpu.tar.gz"
gcloud_flags=(--worker=all "--zone=$zone")
[[ -z "$project" ]] || gcloud_flags+=("--project=$project")

# POSIX shell quoting of each argument ('...' where needed), space-separated.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Prints a command quoted so it can be pasted, then runs it unless --dry-run.
run() {
  quote "$@"
  [[ $dry_run -eq 1 ]] || "$@"
}

q_dir="$(quote "$remote_dir")"
q_command="$(quote "$@")"
unpack="mkdir -p $q_dir && tar -xzf $remote_tarball -C $q_dir"
[[ -z "$setup" ]] || unpack+=" && cd $q_dir && { $setup; }"

if [[ $dry_run -eq 1 ]]; then
  echo "# dry run: commands that would run"
  echo "cd $(quote "$repo") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(quote "$tarball")"
else
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball")
  mkdir -p "$logdir"
fi
run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:$remote_tarball" "${gcloud_flags[@]}"
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --command="$unpack"
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" "--output-directory=$logdir" \
  --command="cd $q_dir && AGEJAX_DISTRIBUTED=auto $q_command"
[[ $dry_run -eq 1 ]] || echo "tpu_pod.sh: done; per-worker logs in $logdir/" >&2
