"""Settings of the asynchronous parameter-server run, checked at the edge (before any actor starts).

Names follow Ray Train where they mean the same thing (``num_workers`` there is ``trainers`` here). Every
message names the command-line flag, so ``torchrec-prune ray-train`` can print it as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torchrec_prune.data.stream import check_int
from torchrec_prune.train.optimizer_state import check_regrown_state

SCHEDULES = ("dense", "alternate", "prune-only", "grow-only", "dsd", "d2s")


@dataclass(frozen=True)
class PSConfig:
    """Shape of the asynchronous run.

    Args:
        trainers: trainer actors, each reading its own partition of the stream (``--trainers``, >= 1).
        servers: parameter-server shards (``--servers``, >= 1). Table rows go to shard ``id % servers``,
            dense tensors are spread by size.
        staleness: a trainer computes on weights pulled at most ``staleness - 1`` server versions before
            the latest version it knows of (``--staleness``, >= 1). With one trainer, 1 is the synchronous
            update rule: it pulls before every step.
        cache_rows: embedding rows per table a trainer holds (``--cache-rows``), in one pool of
            ``cache_rows * tables`` rows shared by all tables; least recently used rows are evicted, so
            trainer memory does not grow with the tables. At least the batch size.
        chunk_steps: batches a trainer runs per call from the driver (``--chunk-steps``); the driver keeps
            two calls queued per trainer, so a trainer never idles waiting for the driver.
        regrow_value: value re-opened weights start from on the server. 0 (the library's rule) keeps the
            function unchanged at growth; a nonzero constant exists to show the jump it causes.
        regrown_state: optimizer state of re-opened entries on the server (``--regrown-state``):
            ``"reset"`` (SPEC 3) or ``"layer_mean"`` (accumulators at the mean of the parameter's entries
            that stay open, over the rows this shard owns for a table); as ``GrowPruneConfig``'s.
        trace_pushes: pushes after each growth over which each shard records the norm of regrown weights.
        max_lead_chunks: a trainer gets no batch more than this many global chunks
            (``chunk_steps * trainers * batch_size`` rows) past the oldest batch not yet consumed
            (``--max-lead-chunks``, 0: no bound). Trainers running at the same pace never reach it; a
            stalled or restarting one holds the others back instead of letting them train far ahead
            in a drifting stream, which the stalled partition would then catch up on out of order.
        shard_checkpoint_pushes: a shard with a checkpoint folder saves itself every this many applied
            pushes (``--shard-checkpoint-pushes``, 0: only at start and at mask changes); a shard
            restored after a fault loses the pushes it applied since.

    Example::

        PSConfig(trainers=2, servers=2, staleness=2)
    """

    trainers: int = 2
    servers: int = 1
    staleness: int = 1
    cache_rows: int = 4096
    chunk_steps: int = 8
    regrow_value: float = 0.0
    regrown_state: str = "reset"
    trace_pushes: int = 200
    max_lead_chunks: int = 4
    shard_checkpoint_pushes: int = 500

    def __post_init__(self) -> None:
        check_int("--trainers", self.trainers, 1)
        check_int("--servers", self.servers, 1)
        check_int("--staleness", self.staleness, 1)
        check_int("--cache-rows", self.cache_rows, 1)
        check_int("--chunk-steps", self.chunk_steps, 1)
        check_int("trace_pushes", self.trace_pushes, 0)
        check_int("--max-lead-chunks", self.max_lead_chunks, 0)
        check_int("--shard-checkpoint-pushes", self.shard_checkpoint_pushes, 0)
        if isinstance(self.regrow_value, bool) or not (
            isinstance(self.regrow_value, (int, float)) and math.isfinite(self.regrow_value)
        ):
            raise ValueError(f"regrow_value must be a finite number, got {self.regrow_value!r}")
        check_regrown_state("--regrown-state", self.regrown_state)

    def check_stream(self, *, rows: int, batch_size: int, increment_rows: int, momentum: float) -> None:
        """Raise ValueError when the stream cannot give every trainer a partition, or momentum is set.

        Each increment is split into global batches of ``batch_size * trainers`` rows; an increment
        shorter than one global batch leaves trainers without data.
        """
        global_batch = batch_size * self.trainers
        if global_batch > increment_rows or global_batch > rows:
            raise ValueError(
                f"--trainers {self.trainers} with --batch-size {batch_size} needs global batches of "
                f"{global_batch} rows, more than --increment-rows {increment_rows} or the stream's {rows} "
                "rows allow: use fewer trainers or smaller batches"
            )
        if self.cache_rows < batch_size:
            raise ValueError(
                f"--cache-rows must be >= --batch-size ({batch_size}) so one batch's rows fit, "
                f"got {self.cache_rows}"
            )
        if momentum:
            raise ValueError(
                "--momentum must be 0 for ray-train: the server applies sparse row updates, and momentum "
                "would keep moving rows no batch touches"
            )
