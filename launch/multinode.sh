#!/usr/bin/env bash
# Run one torchrec-prune command on every node of a multi-node torchrun job (c10d rendezvous).
#
#   NNODES=2 NPROC=8 RDZV=head-host:29400 RUN_ID=gp1 launch/multinode.sh grow-prune --run-dir /shared/gp1
#
# Start it on each node with the same settings. ("--" ends torchrun's options: without it torchrun reads
# command flags such as d2s's --r as abbreviations of its own --rdzv-*.) A lost rank makes torchrun restart the whole group (up to
# MAX_RESTARTS times); the command then resumes from the newest complete run checkpoint in --run-dir,
# which must be on a file system every node sees. LOCAL_ADDR is the address this node is reached at
# (default: loopback, for several agents on one machine).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes "${NNODES:-2}" \
    --nproc-per-node "${NPROC:-1}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${RDZV:-127.0.0.1:29400}" \
    --rdzv-id "${RUN_ID:-torchrec-prune}" \
    --max-restarts "${MAX_RESTARTS:-1}" \
    --local-addr "${LOCAL_ADDR:-127.0.0.1}" \
    -- "$here/torchrun_command.py" "$@"
