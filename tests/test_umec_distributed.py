"""UMEC under DMP (SPEC 8): two torchrun ranks with different data reach the same decisions."""

from __future__ import annotations

import json

from conftest import REPO, run_torchrun

WORKER = REPO / "tests" / "dist_workers" / "umec_worker.py"


def test_umec_decisions_are_identical_across_dmp_ranks_and_fit_the_budget(tmp_path):
    run_torchrun(WORKER, [str(tmp_path)], nproc=2, timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert "error" not in r0 and "error" not in r1
    for key in ("s", "y", "z", "history", "removed", "masks", "flops_fraction"):
        assert r0[key] == r1[key], key
    assert r0["flops_fraction"] <= 0.35
    assert sum(r0["removed"].values()) > 0
    assert any(not all(mask) for key, mask in r0["masks"].items() if key.endswith("feature_gate")) or any(
        not all(mask) for key, mask in r0["masks"].items() if key.endswith("neuron_mask")
    )
    # closed table columns restart from a fresh fused Adagrad state on whichever rank holds them
    assert all(v == 0.0 for v in r0["fused_state_of_closed_columns"] + r1["fused_state_of_closed_columns"])
    assert r0["losses_finite"] and r1["losses_finite"]
