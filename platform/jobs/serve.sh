#!/usr/bin/env sh
# The OpenAI-compatible endpoint as a Ray Serve application, deployed from its config. The code
# is in the image (platform/Dockerfile), so the replicas need no working_dir.
#   platform/jobs/serve.sh [CONFIG]        (default: serve/config.yaml)
# The cluster: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the tunnel of `ray dashboard cluster.yaml`.
set -eu
config=${1:-serve/config.yaml}
cd "$(dirname "$0")/../.."
exec serve deploy --address "${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}" "$config"
