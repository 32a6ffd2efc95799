"""Issue 12 on two torchrun ranks: an EmbeddingCollection model, DLRM_DCN, DeepFM, DLRM_Projection and a
FusedEmbeddingBagCollection model under DMP, grow/prune on a
user stream, and D2S on it (see tests/dist_workers/your_model_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO, run_torchrun


def test_user_models_under_dmp_on_two_ranks(tmp_path: Path) -> None:
    run_torchrun(REPO / "tests" / "dist_workers" / "your_model_worker.py", [str(tmp_path)], timeout=400)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        models = [("embedding_collection", ["s0", "s1", "s2"])]
        models += [
            (name, ["t0", "t1", "t2"]) for name in ("dlrm_dcn", "deepfm", "dlrm_projection", "fused_ebc")
        ]
        for name, tables in models:
            model = seen[name]
            assert model["same_plan"] and model["tables"] == tables  # every table planned, as unwrapped
            assert "wrap() must run before DistributedModelParallel" in model["refused"]
            assert model["round_trip"] and model["finite"]
        grow = seen["grow_prune"]
        assert grow["phases"] == grow["planned"] and len(grow["phases"]) == 5  # every phase, on 2 ranks
        assert all(steps > 0 for steps in grow["steps"])
    assert ranks[0]["grow_prune"]["steps"] == ranks[1]["grow_prune"]["steps"]
    # D2S on the user stream with the custom forward: a new sparse model every 2 increments, windows over
    # the whole stream, and the same serving masks on both ranks.
    d2s = [seen["d2s"] for seen in ranks]
    assert d2s[0]["births"] == [1, 3, 5] and all(s > 0 for s in d2s[0]["sparsity"])
    assert d2s[0]["ends"] == list(range(40, 241, 40))
    assert d2s[0]["masks"] and d2s[0]["masks"] == d2s[1]["masks"]
