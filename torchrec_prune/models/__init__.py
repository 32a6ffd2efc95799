"""Reference models used by the demo, tests and benchmarks."""

from torchrec_prune.models.dlrm import DLRMConfig, build_dlrm

__all__ = ["DLRMConfig", "build_dlrm"]
