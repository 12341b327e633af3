#!/usr/bin/env bash
# Start a local Ray head from the project's environment, with token authentication on.
#   bash cluster/deploy/start_head.sh              # then: see README "On a Ray cluster"
#   .venv/bin/ray stop                             # to stop it
# Every process of the cluster (and every job's entrypoint) runs with .venv/bin first on PATH, so a job's
# `python -m cluster.cli train` uses the project's packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/ray ] || bash scripts/setup.sh
# The token every client must present (created once, in ~/.ray/auth_token; `ray get-auth-token` prints it).
.venv/bin/ray get-auth-token --generate >/dev/null
export RAY_AUTH_MODE=token
export PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv"
# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds: long enough for the job to finish
# the PPO step in progress and write its checkpoint (a SmolLM2 step is ~2 minutes on 2 CPU cores).
export RAY_JOB_STOP_WAIT_TIME_S="${RAY_JOB_STOP_WAIT_TIME_S:-300}"
exec .venv/bin/ray start --head --num-cpus="${RAY_NUM_CPUS:-8}" --dashboard-host=127.0.0.1 \
    --metrics-export-port="${RAY_METRICS_PORT:-8080}" --disable-usage-stats "$@"
