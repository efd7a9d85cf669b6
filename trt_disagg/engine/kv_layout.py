"""Re-slicing KV between parallel layouts, done on the receiving side.

    source TP2 x PP1                full KV                       destination TP1 x PP2
    rank0: layers 0-3, heads 0-1 ┐  layers 0-3, heads 0-3   ┌ rank0: layers 0-1, heads 0-3
    rank1: layers 0-3, heads 2-3 ┘  (stages concatenated    └ rank1: layers 2-3, heads 0-3
                                     on layers, TP ranks on heads)

TP splits KV heads into balanced contiguous groups (contract.tp_slices), PP splits layers (contract.pp_layer_ranges). Assembling the full
tensor then slicing is simple and exact; its cost is one copy of one sequence's KV.
"""

from __future__ import annotations

import torch

from trt_disagg.contract import KVLayout, balanced_ranges, pp_layer_ranges, rank_of
from trt_disagg.exported_kv import ExportedKV


def assemble_full(kv: ExportedKV) -> torch.Tensor:
    """[num_layers, 2, num_tokens, num_kv_heads, head_dim] from the shards of any layout."""
    lay = kv.layout
    stages = []
    for pp_rank in range(lay.pp):
        heads = [kv.shards[rank_of(t, pp_rank, lay.tp)] for t in range(lay.tp)]
        stages.append(torch.cat(heads, dim=3))
    return torch.cat(stages, dim=0)


def slice_for(full: torch.Tensor, layout: KVLayout) -> dict[int, torch.Tensor]:
    """Shards of `full` for each rank of `layout`."""
    head_ranges = balanced_ranges(layout.num_kv_heads, layout.tp)  # as contract.tp_slices splits KV heads
    out: dict[int, torch.Tensor] = {}
    for pp_rank, layers in enumerate(pp_layer_ranges(layout.num_layers, layout.pp)):
        for t, heads in enumerate(head_ranges):
            part = full[layers.start:layers.stop, :, :, heads.start:heads.stop]
            out[rank_of(t, pp_rank, layout.tp)] = part.contiguous()
    return out


def convert(kv: ExportedKV, dst: KVLayout) -> dict[int, torch.Tensor]:
    """The destination's shards for `kv`, raising ValueError when the models differ."""
    why = kv.layout.compatible_with(dst)
    if why is not None:
        raise ValueError(f"cannot import KV: {why}")
    if kv.layout.tp == dst.tp and kv.layout.pp == dst.pp:
        return kv.shards
    return slice_for(assemble_full(kv), dst)
