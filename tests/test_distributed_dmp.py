"""DMP sharding, pruning and DCP checkpoints of a wrapped DLRM on two real ranks (torchrun, gloo, CPU).

One torchrun run (tests/dist_workers/dmp_worker.py) does every check and asserts inside each rank; the
tests here read what each rank recorded and check it again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.types import ShardingPlan

from torchrec_prune.distributed.checkpoint import load_checkpoint
from torchrec_prune.distributed.dmp import ShardingConfig, plan_by_table, plan_sharding
from torchrec_prune.masks import MaskedEmbeddingBagCollection, masked_modules, wrap
from torchrec_prune.models.dlrm import build_dlrm

REPO = Path(__file__).resolve().parents[1]
WORKER_PATH = REPO / "tests" / "dist_workers" / "dmp_worker.py"
WORLD = 2
TIMEOUT_S = 240

_spec = importlib.util.spec_from_file_location("dmp_worker", WORKER_PATH)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dmp")


@pytest.fixture(scope="module")
def ranks(run_dir: Path) -> list[dict[str, Any]]:
    """Launch the two-rank worker once and return what every rank recorded."""
    ckpt = run_dir / "ckpt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        str(WORKER_PATH), str(run_dir), str(ckpt),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}")
    results = []
    for rank in range(WORLD):
        path = run_dir / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"error": "no result written"})
    errors = {rank: r["error"] for rank, r in enumerate(results) if "error" in r}
    if proc.returncode != 0 or errors:
        pytest.fail(
            f"torchrun exited with {proc.returncode}; rank errors: {json.dumps(errors, indent=1)}\n"
            f"stderr (tail):\n{proc.stderr[-6000:]}"
        )
    return results


@pytest.mark.parametrize(
    "kwargs",
    [{"fused_optimizer": "momentum"}, {"dense_optimizer": "lbfgs"}, {"lr": 0.0}, {"dense_lr": -1.0},
     {"batch_size": 0}, {"storage_reservation": 1.0}, {"momentum": 1.0}],
)  # fmt: skip
def test_sharding_config_rejects_bad_values_naming_the_field(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"ShardingConfig.{next(iter(kwargs))} must"):
        ShardingConfig(**kwargs)
    with pytest.raises(ValueError, match="ShardingConfig.momentum applies to dense_optimizer 'sgd' only"):
        ShardingConfig(dense_optimizer="adagrad", momentum=0.9)


@pytest.mark.parametrize("compute_device", ["cpu", "cuda"])  # planning needs no GPU
def test_local_plans_of_wrapped_and_unwrapped_models_match(compute_device: str) -> None:
    config = ShardingConfig(constraints=worker.CONSTRAINTS)
    plans = [
        plan_sharding(model, config, world_size=4, local_world_size=2, compute_device=compute_device)
        for model in (build_dlrm(worker.CONFIG, "meta"), wrap(build_dlrm(worker.CONFIG, "meta")))
    ]
    plain, wrapped = (plan_by_table(p) for p in plans)
    assert plain == wrapped
    assert {t.module for t in wrapped.values()} == {f"{worker.EBC}.ebc"}
    assert wrapped["t_cat_1"].sharding_type == "column_wise" and len(wrapped["t_cat_1"].shards) == 2
    assert sorted(s.offsets for s in wrapped["t_cat_1"].shards) == [(0, 0), (0, 4)]
    module_plan = plans[1].plan[f"{worker.EBC}.ebc"]
    with pytest.raises(ValueError, match="table 't_cat_0' is planned in both 'a' and 'b'"):
        plan_by_table(ShardingPlan(plan={"a": module_plan, "b": module_plan}))


def test_wrapped_model_gets_the_unwrapped_plan_table_for_table(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        plan = result["plan"]
        assert plan["identical"]
        assert plan["modules"] == [f"{worker.EBC}.ebc"]
        assert plan["plain_modules"] == [worker.EBC]
        tables = plan["tables"]
        assert tables["t_cat_0"][:2] == ["data_parallel", "dense"]
        assert tables["t_cat_1"] == ["column_wise", "fused", [0, 1], 2]
        assert {tables[t][0] for t in ("t_cat_2", "t_cat_3")} == {"table_wise"}
    assert ranks[0]["plan"]["tables"] == ranks[1]["plan"]["tables"]


def test_training_runs_with_finite_loss_and_identical_dense_replicas(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        losses = result["losses"] + result["prune"]["losses"]
        assert len(losses) == 6 and all(0 < x < 10 for x in losses)
        assert result["prune"]["dense_replicas_equal"]


def test_mask_buffers_are_in_the_sharded_state_dict_and_open(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        keys = result["masks"]["keys"]
        linear_masks = [k for k in keys if k.endswith(("weight_mask", "neuron_mask", "input_mask"))]
        assert len(linear_masks) == 3 * 4  # two bottom and two top Linears
        assert f"{worker.EBC}.feature_gate" in keys
        assert {f"{worker.EBC}.dim_masks.t_cat_{i}" for i in range(4)} <= set(keys)
        assert result["masks"]["missing"] == [] and result["masks"]["not_all_true"] == []


def test_prune_on_sharded_model_zeros_live_fused_columns_that_stay_zero(ranks: list[dict[str, Any]]) -> None:
    held = {t: 0 for t in worker.PRUNED_COLUMNS}
    changed: set[str] = set()
    for result in ranks:
        prune = result["prune"]
        assert prune["closed_columns"] == sum(len(c) for c in worker.PRUNED_COLUMNS.values())
        assert prune["closed_weights"] == len(worker.PRUNED_NEURONS) * worker.CONFIG.num_dense
        assert all(prune["local_shards_are_kernel_views"].values())
        assert prune["held_after_prune"] == prune["held_after_training"]
        assert prune["pruned_neurons_zero"]
        for table, counts in prune["lookup"].items():
            assert counts["pruned_nonzero"] == 0 < counts["kept_nonzero"], table
        for table, count in prune["held_after_training"].items():
            held[table] += count
        changed |= set(prune["weights_changed_by_training"])
    rows = worker.CONFIG.num_embeddings
    # Every pruned entry was checked on some rank: replicated t_cat_0 on both, sharded tables once.
    assert held == {"t_cat_0": WORLD * rows, "t_cat_1": 2 * rows, "t_cat_2": rows}
    assert {f"{worker.EBC}.ebc.embedding_bags.t_cat_{i}.weight" for i in range(4)} <= changed


def test_dcp_round_trip_restores_weights_and_masks_bit_for_bit(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        ckpt = result["checkpoint"]
        assert ckpt["differ_after_load"] == []
        assert ckpt["mask_keys_differing_before_load"]  # the fresh model's masks were all open
        assert ckpt["logits_equal"]


def test_checkpoint_of_other_model_is_refused_with_key_and_both_shapes(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        message = result["mismatch"]
        layer = "model.dense_arch.model._mlp.0._linear"
        assert f"'{layer}.weight' of module '{layer}': checkpoint has shape (16, 13) float32, " in message
        assert "model has shape (32, 13) float32" in message
        assert f"mask '{layer}.neuron_mask'" in message and "(16,) bool" in message
        assert "embedding_bags" not in message  # tables match and are not reported


def test_exact_adagrad_state_of_regrown_columns_is_reset(ranks: list[dict[str, Any]]) -> None:
    steps: list[float] = []
    for result in ranks:
        reset = result["adagrad_reset"]
        assert reset["other_state_nonzero"] > 0
        steps += reset["first_steps"]
    assert sum(r["adagrad_reset"]["reset_entries"] for r in ranks) == 3 * worker.CONFIG.num_embeddings
    assert len(steps) > 10
    assert steps == pytest.approx([worker.LR] * len(steps), rel=1e-3)


def test_compacted_layers_train_like_masked_ones_on_two_ranks(ranks: list[dict[str, Any]]) -> None:
    # Half the neurons of the two prunable layers closed; after 2 steps, 4 compacted steps and 2 steps
    # after expanding, losses, weights, masks and dense optimizer state equal the masked run's exactly.
    for result in ranks:
        compact = result["compact"]
        assert compact["losses"]["compacted"] == compact["losses"]["masked"]
        assert compact["differing_after"] == [] and compact["shapes_during"] == []
        assert compact["shapes"]["_dmp_wrapped_module.module.model.dense_arch.model._mlp.0._linear"] == [
            8,
            13,
        ]
        assert compact["shapes"]["_dmp_wrapped_module.module.model.over_arch.model.1"] == [1, 8]
    assert ranks[0]["compact"]["losses"] != ranks[1]["compact"]["losses"]  # each rank its own batches


def test_two_rank_checkpoint_loads_into_a_single_process_model(
    ranks: list[dict[str, Any]], run_dir: Path
) -> None:
    model = wrap(build_dlrm(worker.CONFIG))
    load_checkpoint(model, run_dir / "ckpt")
    sharded = set(ranks[0]["checkpoint"]["sharded_keys"])
    assert sharded == {f"{worker.EBC}.ebc.embedding_bags.t_cat_{i}.weight" for i in (1, 2, 3)}
    state = model.state_dict()
    for key, value in state.items():
        parts = [r["checkpoint"]["checksums"][key] for r in ranks]
        expected = sum(parts) if key in sharded else parts[0]
        assert float(value.double().sum()) == pytest.approx(expected, rel=1e-9, abs=1e-9), key
    ebc = next(m for _, m in masked_modules(model) if isinstance(m, MaskedEmbeddingBagCollection))
    for table, cols in worker.PRUNED_COLUMNS.items():
        assert torch.nonzero(~ebc.dim_mask(table)).flatten().tolist() == cols
        assert torch.count_nonzero(ebc.ebc.embedding_bags[table].weight[:, cols]) == 0
    neuron_mask = state["model.dense_arch.model._mlp.0._linear.neuron_mask"]
    assert torch.nonzero(~neuron_mask).flatten().tolist() == worker.PRUNED_NEURONS
