#!/usr/bin/env bash
# Submit a job to an existing Ray cluster with `ray job submit`.
#   scripts/submit_ray_job.sh [CONFIG] [key=value ...]
# RAY_DASHBOARD_ADDRESS (default http://127.0.0.1:8265) names the cluster's job server. The working
# directory (minus .gitignore'd paths such as .venv and runs/) is uploaded; the cluster's Python
# must have the project's dependencies (e.g. the same .venv on a shared filesystem).
set -euo pipefail
config=${1:-configs/ray_cluster.yaml}
shift || true
address=${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}
cd "$(dirname "$0")/.."
exec ray job submit --address "$address" --working-dir . -- \
  python -m coordinator run "$config" "$@"
