#!/usr/bin/env bash
# Runs gdd on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra gdd.main flags...]
#
# e.g. launch/tpu_pod.sh gdd-v4-64 us-central2-b configs/imagenet64.py \
#        gs://my-bucket/gdd/imagenet64 --config.data.data_dir=gs://my-bucket/tfds
#
# Each worker clones nothing: the repository is copied from this machine with
# `gcloud ... scp`, installed with the pinned constraints, and started with
# --config.distributed.initialize=True so the processes find each other.
# WORKDIR and data_dir must be on storage every worker sees (a GCS bucket).
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,12p' "$0"
  exit 2
fi
tpu_name=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)

tarball=$(mktemp --suffix=.tar.gz)
git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
gcloud compute tpus tpu-vm scp "$tarball" "$tpu_name:~/gdd.tar.gz" \
  --zone="$zone" --worker=all
rm -f "$tarball"

remote="set -e; rm -rf ~/gdd && mkdir ~/gdd && tar -xzf ~/gdd.tar.gz -C ~/gdd && cd ~/gdd \
  && pip install -q -c constraints.txt -e . 'jax[tpu]' \
  && python -m gdd.main --config=$config --workdir=$workdir \
       --config.distributed.initialize=True $*"
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all \
  --command="$remote"
