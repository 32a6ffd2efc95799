"""Asynchronous data-parallel training on Ray with a sharded parameter server (SPEC 8).

Library classes (``server.ShardState``, ``trainer.PSTrainer``, ``collector.ScoreCollector``,
``schedule.AsyncGrowPrune``) run without Ray; ``actors`` wraps them as Ray actors and
``driver.run_async`` runs them on either backend (``backends``), through faults (``store``: a shard's
own checkpoints; ``run_state``: whole-run checkpoints); ``d2s.run_d2s_ray`` runs D2S's jobs as actors. Only
the light modules are imported here, so registering the command line costs no DMP/DCP import.
"""

from torchrec_prune.distributed.ps.config import PSConfig
from torchrec_prune.distributed.ps.runtime import ray_session

__all__ = ["PSConfig", "ray_session"]
