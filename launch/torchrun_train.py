"""torchrun entry point: each rank runs ``torchrec-prune train`` with the given flags.

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        launch/torchrun_train.py --data criteo:/data/train.txt --run-dir runs/criteo
"""

import sys

from torchrec_prune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
