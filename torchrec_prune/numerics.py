"""Flush-to-zero / denormals-are-zero for the process and every intra-op thread (SPEC 8).

Zero-initialised growth produces denormal floats (tiny updates on exact zeros), which cost 5x-260x per
operation on many x86 CPUs. ``torch.set_flush_denormal(True)`` only sets the MXCSR register of the calling
thread: OpenMP worker threads that already exist keep their own. ``enable_ftz_daz`` therefore also runs
``set_flush_denormal`` inside one OpenMP parallel region of the intra-op team, through the OpenMP runtime
that torch itself loaded, so every worker of that team sets its own register.
"""

from __future__ import annotations

import ctypes
import threading

import torch
from torch import nn

_lock = threading.Lock()
_FLOAT_TINY = {
    torch.float32: torch.finfo(torch.float32).tiny,
    torch.float64: torch.finfo(torch.float64).tiny,
    torch.float16: torch.finfo(torch.float16).tiny,
    torch.bfloat16: torch.finfo(torch.bfloat16).tiny,
}


def _loaded_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime already mapped into this process (torch's own copy), if any."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {
                line.split()[-1]
                for line in maps
                if "omp" in line and line.rstrip().endswith((".so", ".so.1", ".so.5"))
            }
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "GOMP_parallel"):
            return lib
    return None


_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _set_on_current_thread(_data: int | None) -> None:
    torch.set_flush_denormal(True)


_callback = _CALLBACK_TYPE(_set_on_current_thread)


def enable_ftz_daz() -> bool:
    """Set FTZ/DAZ on this thread and on every intra-op worker thread; returns whether the CPU supports it.

    Safe to call repeatedly (e.g. after ``torch.set_num_threads`` changes the team size).
    """
    with _lock:
        supported = torch.set_flush_denormal(True)
        if not supported:
            return False
        lib = _loaded_openmp()
        threads = torch.get_num_threads()
        if lib is not None and threads > 1:
            # GOMP_parallel(fn, data, num_threads, flags): the team is the same pool torch's parallel_for
            # reuses, so each of its threads runs the callback once and sets its own MXCSR.
            lib.GOMP_parallel(_callback, None, ctypes.c_uint(threads), ctypes.c_uint(0))
        return True


def disable_ftz_daz() -> None:
    """Turn FTZ/DAZ off on this thread (worker threads keep what they had); for measuring its cost."""
    torch.set_flush_denormal(False)


def count_denormals(model: nn.Module | torch.Tensor) -> int:
    """Number of nonzero values with magnitude below the smallest normal, over parameters and buffers."""
    tensors = [model] if isinstance(model, torch.Tensor) else [*model.parameters(), *model.buffers()]
    total = 0
    for t in tensors:
        tiny = _FLOAT_TINY.get(t.dtype)
        if tiny is None or t.device.type == "meta":
            continue
        data = _local(t)
        total += int(((data != 0) & (data.abs() < tiny)).sum())
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(t, ShardedTensor):
        shards = [s.tensor.detach().flatten() for s in t.local_shards()]
        return torch.cat(shards) if shards else torch.zeros(0)
    return t.detach()
