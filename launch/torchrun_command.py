"""torchrun entry point: each rank runs one ``torchrec-prune`` command (train, grow-prune, d2s).

Single node, 2 ranks, restarts on a lost rank (the command resumes from its newest run checkpoint):

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 -- \\
        launch/torchrun_command.py grow-prune --scheme alternate --run-dir runs/gp

(``--`` ends torchrun's own options; without it torchrun takes ``d2s --r 4`` for its ``--rdzv-*``.)

Multi-node: the same on every node with a c10d rendezvous (see ``launch/multinode.sh``); ``--run-dir``
must be on a file system that every node sees.
"""

import sys

from torchrec_prune.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
