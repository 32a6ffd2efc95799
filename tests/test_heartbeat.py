"""The rank heartbeat ends with its process: no abort at exit, whatever the thread is doing then."""

import subprocess
import sys
import textwrap

from conftest import REPO

# A rank whose heartbeat beats as fast as it can, so that at exit the thread is inside the store's C++
# call: a daemon thread ended there by the interpreter's finalization aborts the process.
RANK = textwrap.dedent(
    """
    import time
    import torch.distributed as dist
    from torchrec_prune.distributed.dmp import start_heartbeat
    store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    start_heartbeat(interval=0.0)
    time.sleep(0.3)
    """
)


def test_a_rank_with_a_busy_heartbeat_exits_cleanly():
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", RANK], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
