#!/usr/bin/env sh
# Evaluation as a Ray job: models side by side on the held-out reports, report in output_dir/eval.
#   platform/jobs/evaluate.sh radiology_qlora_70b \
#       --model base=/mnt/shared/models/Meta-Llama-3-70B-Instruct \
#       --model qlora=/mnt/shared/medray/radiology_qlora_70b/train/finetune/model
# The cluster: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the tunnel of `ray dashboard cluster.yaml`.
set -eu
recipe=${1:?usage: platform/jobs/evaluate.sh RECIPE --model NAME=PATH_OR_URL ... [pipelines.evaluate options]}
shift
cd "$(dirname "$0")/../.."
export RAY_API_SERVER_ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
exec ray job submit --submission-id "evaluate-$recipe-$(date +%Y%m%d-%H%M%S)" \
    --working-dir . --runtime-env platform/runtime_env.yaml \
    -- python -m pipelines.evaluate --recipe "$recipe" "$@"
