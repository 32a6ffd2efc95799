"""Two real processes (gloo on loopback) see different data yet reach the same masks (SPEC 8)."""

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port
from torch import nn

import torchrec_prune as tp
from torchrec_prune.pruners import AuxConfig, AuxPruner, GradualConfig, OneShot, TopK, taylor_pruner
from torchrec_prune.train.hooks import StepContext

WORLD = 2


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)  # identical weights on every rank
    return tp.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1)))


def _backward(model: nn.Module, generator: torch.Generator) -> None:
    x = torch.randn(32, 8, generator=generator)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).float()
    model.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y).backward()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a small machine
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
        result: dict[str, dict[str, torch.Tensor]] = {"tp": {}, "tp_local": {}, "aux": {}, "aux_grad": {}}

        # TP, no weight updates (weights stay identical): only the synced statistics decide the mask.
        model = _mlp()
        pruner = taylor_pruner(model, GradualConfig(sparsity=0.6), schedule=OneShot(3))
        ctx = StepContext(model=model, optimizers=[])
        for _ in range(3):
            _backward(model, data)
            pruner.before_step(ctx)
            if pruner.steps == 2:  # what this rank alone would pick, before the statistics are averaged
                for fqn, acc in pruner.scorer._sums.items():
                    current = torch.ones_like(pruner.linears[fqn].weight_mask)
                    result["tp_local"][fqn] = TopK()(acc.clone(), 0.6, current)
            pruner.after_step(ctx)
        result["tp"] = {fqn: layer.weight_mask.clone() for fqn, layer in pruner.linears.items()}

        # AUX, adaptation variant, no weight updates: latent scores follow the averaged mask gradient.
        model = _mlp()
        pruner = AuxPruner(model, AuxConfig(lam=1.0, eps=0.3, phase_steps=None))
        ctx = StepContext(model=model, optimizers=[])
        for _ in range(6):
            _backward(model, data)
            result["aux_grad"] = {fqn: layer.effective_grad.clone() for fqn, layer in pruner.linears.items()}
            pruner.before_step(ctx)
            pruner.after_step(ctx)
        result["aux"] = {fqn: layer.weight_mask.clone() for fqn, layer in pruner.linears.items()}
        result["aux_latent"] = {fqn: latent.clone() for fqn, latent in pruner.latent.items()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tp_and_aux_masks_are_identical_across_ranks_with_different_data(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for fqn in r0["tp"]:
        assert torch.equal(r0["tp"][fqn], r1["tp"][fqn]), fqn
        n = r0["tp"][fqn].numel()
        assert int(r0["tp"][fqn].sum()) == n - int(0.6 * n + 0.5)
    # The ranks' own statistics would have given different masks: the all-reduce is what aligns them.
    assert any(not torch.equal(r0["tp_local"][f], r1["tp_local"][f]) for f in r0["tp_local"])
    for fqn in r0["aux"]:
        assert not torch.equal(r0["aux_grad"][fqn], r1["aux_grad"][fqn])
        assert torch.equal(r0["aux"][fqn], r1["aux"][fqn]), fqn
        torch.testing.assert_close(r0["aux_latent"][fqn], r1["aux_latent"][fqn])
    closed = sum(int((~m).sum()) for m in r0["aux"].values())
    assert 0 < closed < sum(m.numel() for m in r0["aux"].values())
