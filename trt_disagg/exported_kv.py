"""`ExportedKV`: the KV of one sequence between two engines, the one type the engine and kv/ share.

The engine produces it (a prefilled request's KV, `export_kv`) and consumes it (`add_decode_request`);
kv/ moves it between processes. Neither package may import the other (the engine knows nothing of
transports, the transports nothing of the engine's internals), so the type sits beside both in this leaf
module, which imports only the contract. torch is needed only to name the shards' type, so it is imported
for type checking alone: reading this module costs a process nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trt_disagg.contract import KVLayout

if TYPE_CHECKING:
    import torch


@dataclass
class ExportedKV:
    """The KV of one sequence as it leaves an engine: in the *source* layout, converted by the receiver.

    shards[rank] holds that rank's slice as a tensor [layers_of_stage, 2 (K,V), num_tokens, kv_heads/tp, head_dim]
    for the layers pp_layer_ranges(num_layers, pp)[pp_rank] and heads of tp_rank.
    """

    layout: KVLayout
    num_tokens: int
    shards: dict[int, torch.Tensor]
