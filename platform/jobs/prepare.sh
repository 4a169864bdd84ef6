#!/usr/bin/env sh
# Data preparation as a Ray job: raw reports -> de-identified records -> packed shards, written to
# the recipe's output_dir/data on shared storage.
#   platform/jobs/prepare.sh radiology_qlora_70b [--set key=value ...]
# The cluster: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the tunnel of `ray dashboard cluster.yaml`.
set -eu
recipe=${1:?usage: platform/jobs/prepare.sh RECIPE [pipelines.prepare options]}
shift
cd "$(dirname "$0")/../.."
export RAY_API_SERVER_ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
exec ray job submit --submission-id "prepare-$recipe-$(date +%Y%m%d-%H%M%S)" \
    --working-dir . --runtime-env platform/runtime_env.yaml \
    -- python -m pipelines.prepare --recipe "$recipe" "$@"
