#!/bin/bash
# Pre-training on a Cloud TPU pod slice: the same command on every worker (one process per host);
# jax.distributed.initialize() auto-detects the TPU topology. The workdir must be shared (gs://...).
#
#   launch/tpu_pod.sh my-tpu-v5p-64 us-east5-a configs/pretrain.py:base gs://bucket/blip_base \
#       --config.init_vision_from=gs://bucket/ckpt/deit_base_patch16_224 \
#       --config.init_text_from=gs://bucket/ckpt/bert-base-uncased
#
# Preemption/maintenance sends SIGTERM: the trainer saves and exits 0; run the same command again to
# resume. Set REPO_URL / BRANCH to install another revision on the workers.
set -euo pipefail
TPU_NAME=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
ZONE=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
CONFIG=${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
WORKDIR=${4:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
shift 4
REPO_URL=${REPO_URL:-https://github.com/blip-jax/blip-jax.git}
BRANCH=${BRANCH:-main}
EXTRA=$(printf ' %q' "$@")

SETUP="set -e; if [ ! -d ~/blip-jax ]; then git clone -b $BRANCH $REPO_URL ~/blip-jax; fi; \
cd ~/blip-jax && git fetch -q && git checkout -q $BRANCH && git pull -q; \
pip install -q 'jax[tpu]' -e ."
RUN="cd ~/blip-jax && TF_CPP_MIN_LOG_LEVEL=3 JAX_COMPILATION_CACHE_DIR=$WORKDIR/xla_cache \
python -m blip_jax.train --distributed --config $CONFIG --workdir $WORKDIR$EXTRA"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$SETUP"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$RUN"
