#!/usr/bin/env bash
# Submit a torchrec-prune command to a Ray cluster as a job (Ray's Job Submission API), with the package
# shipped in the job's runtime env; streams the job's log and exits with its status (0 succeeded,
# 1 failed, 2 bad input: nothing submitted).
#
#   RAY_AUTH_TOKEN_PATH=/secure/auth_token launch/ray_submit.sh --address http://HEAD:8265 \
#       -- ray-train --schedule alternate --trainers 8 --servers 2 --run-dir /shared/runs/gp1
#
# --no-wait prints the job id instead; `torchrec-prune ray-status|ray-logs --address ... JOB_ID` read it back.
set -euo pipefail
exec "${PYTHON:-python}" -m torchrec_prune.cli ray-submit "$@"
