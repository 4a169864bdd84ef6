#!/usr/bin/env sh
# Training as a Ray job: the recipe's stages on Ray Train, reading output_dir/data and writing
# output_dir/train (model or adapter, metrics, checkpoints). After a failure, add --resume.
#   platform/jobs/train.sh radiology_qlora_70b [--resume] [--set key=value ...]
# The cluster: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the tunnel of `ray dashboard cluster.yaml`.
set -eu
recipe=${1:?usage: platform/jobs/train.sh RECIPE [pipelines.train options]}
shift
cd "$(dirname "$0")/../.."
export RAY_API_SERVER_ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
exec ray job submit --submission-id "train-$recipe-$(date +%Y%m%d-%H%M%S)" \
    --working-dir . --runtime-env platform/runtime_env.yaml \
    -- python -m pipelines.train --recipe "$recipe" "$@"
