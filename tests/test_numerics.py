"""FTZ/DAZ reaches every intra-op thread: checked by results, not by timing."""

import subprocess
import sys

import torch

import torchrec_prune as tp

_CHILD = r"""
import torch
torch.set_num_threads(2)
torch.ones(4_000_000).mul(2).sum()  # the OpenMP team exists before FTZ/DAZ is set
from torchrec_prune.numerics import enable_ftz_daz
mode = __import__("sys").argv[1]
if mode == "thread-only":
    torch.set_flush_denormal(True)
else:
    assert enable_ftz_daz()
tiny = torch.full((4_000_000,), 1e-30)
product = tiny * 1e-10          # 1e-40 is denormal in float32: FTZ must flush it on every thread
a = torch.full((512, 512), 1e-20)
print(int(torch.count_nonzero(product)), int(torch.count_nonzero(a @ a)))
"""


def _run(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    first, second = out.stdout.split()
    return int(first), int(second)


def test_enable_ftz_daz_flushes_denormals_on_all_intra_op_threads():
    assert _run("all-threads") == (0, 0)


def test_set_flush_denormal_alone_misses_existing_worker_threads():
    # The reason enable_ftz_daz exists: the already-running worker thread keeps producing denormals.
    nonzero, _ = _run("thread-only")
    assert nonzero > 0


def test_count_denormals():
    tp.numerics.disable_ftz_daz()  # other tests may have enabled it: denormal literals would flush to 0
    try:
        layer = torch.nn.Linear(4, 4)
        with torch.no_grad():
            layer.weight.zero_()
            layer.weight[0, :3] = 1e-41
            layer.bias.fill_(1.0)
        assert tp.count_denormals(layer) == 3
        assert tp.count_denormals(torch.tensor([0.0, 1e-39, 1.0])) == 1
    finally:
        tp.enable_ftz_daz()
