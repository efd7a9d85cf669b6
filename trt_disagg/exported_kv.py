"""`ExportedKV`: the KV of one sequence between two engines, the one type the engine and kv/ share.

The engine produces it (a prefilled request's KV, `export_kv`) and consumes it (`add_decode_request`);
kv/ moves it between processes. Neither package may import the other (the engine knows nothing of
transports, the transports nothing of the engine's internals), so the type sits beside both in this leaf
module, which imports only the contract. torch is needed only to name the shards' type, so it is imported
for type checking alone: reading this module costs a process nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trt_disagg.contract import KVLayout

if TYPE_CHECKING:
    import torch


@dataclass
class ExportedKV:
    """The KV of one sequence as it leaves an engine: in the *source* layout, converted by the receiver.

    shards[rank] holds that rank's slice as a tensor [layers_of_stage, 2 (K,V), num_tokens, kv_heads/tp, head_dim]
    for the layers pp_layer_ranges(num_layers, pp)[pp_rank] and heads of tp_rank.

    `recycle` is how a receiver gets the shards' memory back for its next pull (kv/buffers.py): the
    consumer calls `consumed()` once it has copied the bytes out, and must not read the shards after.
    """

    layout: KVLayout
    num_tokens: int
    shards: dict[int, torch.Tensor]
    recycle: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def consumed(self) -> None:
        """The bytes were copied out (the engine wrote them into its pool): their memory may be reused.
        Idempotent; a KV nobody calls this for is simply garbage-collected."""
        recycle, self.recycle = self.recycle, None
        if recycle is not None:
            recycle()
