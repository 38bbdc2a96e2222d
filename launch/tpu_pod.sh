#!/usr/bin/env bash
# Runs gdd on every worker of a Cloud TPU VM pod slice, detached.
#
#   launch/tpu_pod.sh [--dry_run] TPU_NAME ZONE CONFIG WORKDIR [gdd.main flags]
#
# e.g. launch/tpu_pod.sh gdd-v4-64 us-central2-b configs/imagenet64.py \
#        gs://my-bucket/gdd/imagenet64 \
#        --config.data.data_dir=gs://my-bucket/tfds
#
# Copies the checked-out commit (git archive HEAD: uncommitted changes stay
# behind) to every worker, installs it there with the pinned constraints.txt
# plus jax[tpu], starts `python -m gdd.main ... --config.distributed.
# initialize=True` on all workers with setsid/nohup (log and pid file in
# ~/gdd_logs/RUN.{log,pid} on each worker), then streams worker 0's log.
# Ctrl-C stops the streaming, not the run. WORKDIR and data_dir must be on
# storage every worker sees (a GCS bucket). --dry_run prints the commands
# instead of running them.
#
# Afterwards (RUN is printed at the start):
#   status: gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#             --command='tail -n 3 ~/gdd_logs/RUN.log'
#   stop:   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#             --command='kill $(cat ~/gdd_logs/RUN.pid)'
#           (SIGTERM on every worker, as a preemption sends: JAX's
#           preemption service has all workers save the same step and stop;
#           re-running the launch command resumes. Not yet tried on a pod.)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

dry_run=false
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --dry_run) dry_run=true ;;
    -h | --help) usage; exit 0 ;;
    *) echo "tpu_pod.sh: unknown option $1 (options come first)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 4 ]]; then
  usage >&2
  exit 2
fi
tpu_name=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
run=gdd-$(date +%Y%m%d-%H%M%S)
tarball=${TMPDIR:-/tmp}/$run.tar.gz

# Runs a command, or with --dry_run prints it, quoted so it can be re-run.
run_or_print() {
  if $dry_run; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# `gcloud compute tpus tpu-vm ssh` on the given workers with a remote command.
tpu_ssh() {
  run_or_print gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" \
    --worker="$1" --command="$2"
}

# The gdd.main command line, each argument quoted for the workers' shell.
printf -v gdd_command '%q ' python -m gdd.main --config="$config" \
  --workdir="$workdir" --config.distributed.initialize=True "$@"
log="\$HOME/gdd_logs/$run.log"
pid="\$HOME/gdd_logs/$run.pid"

echo "Run $run: log and pid in ~/gdd_logs/$run.{log,pid} on each worker."
run_or_print git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
run_or_print gcloud compute tpus tpu-vm scp "$tarball" \
  "$tpu_name:~/gdd.tar.gz" --zone="$zone" --worker=all
run_or_print rm -f "$tarball"
tpu_ssh all "set -e; rm -rf ~/gdd && mkdir ~/gdd \
&& tar -xzf ~/gdd.tar.gz -C ~/gdd \
&& cd ~/gdd && pip install -q -c constraints.txt -e . 'jax[tpu]'"
# setsid + nohup + redirected stdio: the run outlives this ssh session.
tpu_ssh all "mkdir -p ~/gdd_logs && cd ~/gdd \
&& { setsid nohup $gdd_command > $log 2>&1 < /dev/null & echo \$! > $pid; }"
echo "Streaming worker 0's log; Ctrl-C stops the streaming, not the run. Stop:"
echo "  gcloud compute tpus tpu-vm ssh $tpu_name --zone=$zone --worker=all \\"
echo "    --command='kill \$(cat ~/gdd_logs/$run.pid)'"
tpu_ssh 0 "tail -n +1 -F $log"
