"""Bytes the masks of the wrapped reference DLRM hold per parameter, with no pruning, structured pruning
only, and element pruning; writes docs/results/perf_masks.json.

    .venv/bin/python benchmarks/perf_masks.py
"""

from __future__ import annotations

import torch
from perf_common import reference_config, write_results

from torchrec_prune.masks import MaskedLinear, prune_, wrap
from torchrec_prune.masks.report import MaskMemory, mask_memory
from torchrec_prune.models import build_dlrm


def _row(label: str, memory: MaskMemory) -> dict[str, object]:
    return {
        "setting": label,
        "mask_bytes": memory.mask_bytes,
        "fc_parameters": memory.fc_parameters,
        "table_parameters": memory.table_parameters,
        "bytes_per_fc_parameter": memory.bytes_per_fc_parameter,
        "bytes_per_parameter": memory.bytes_per_parameter,
    }


def main() -> None:
    torch.manual_seed(0)
    model = wrap(build_dlrm(reference_config()))
    rows = [_row("no pruning", mask_memory(model))]
    linears = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    for layer in linears[:-1]:  # 70% of every layer's neurons but the logit's
        keep = torch.rand(layer.out_features) >= 0.7
        prune_(layer, neuron_mask=keep)
    rows.append(_row("neurons pruned (beta 0.7)", mask_memory(model)))
    for layer in linears:
        prune_(layer, weight_mask=torch.rand_like(layer.weight) >= 0.5)
    rows.append(_row("neurons and 50% of elements pruned", mask_memory(model)))
    path = write_results("perf_masks", {"rows": rows})
    for row in rows:
        print(f"{row['setting']:40s} {row['bytes_per_fc_parameter']:.4f} B/FC param, {row['mask_bytes']} B")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
