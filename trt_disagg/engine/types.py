"""The engine's public data types: what comes out of a step (token events, step stats).

Requests go in as contract types (SamplingParams, RequestType); the engine directory it loads from is
`trt_disagg.engine_dir`; the KV it exports and imports is `trt_disagg.exported_kv.ExportedKV`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end_id generated
    LENGTH = "length"  # max_new_tokens reached
    PREFILL_DONE = "prefill_done"  # context_only: first token generated, KV kept for hand-off
    ABORTED = "aborted"
    FAILED = "failed"  # this sequence alone could not go on (its sampling or grammar failed); see `error`


@dataclass(frozen=True)
class StepStats:
    """What one `LLMEngine.step()` did and how long it took: TensorRT-LLM's iteration stats, for the
    instance's iteration log (served step times next to the profiled ones)."""

    kind: str  # "prefill" | "decode"
    num_seqs: int
    num_tokens: int  # tokens computed: prompt tokens (prefill) or one per sequence (decode)
    sum_context: int  # KV tokens attended over, all sequences
    duration_s: float  # the whole step: imports, forward, sampling, staging prefilled KV
    imported_tokens: int = 0  # pulled KV written into the pool before the forward pass
    import_s: float = 0.0  # ... and how long that took (part of duration_s)
    reused_tokens: int = 0  # prefill: prompt tokens taken from the prefix cache instead of computed


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, as returned by `LLMEngine.step()`."""

    request_id: str
    token_id: int | None  # None only when finish_reason is FAILED: no token was produced
    finish_reason: FinishReason | None  # None while the request goes on
    error: str | None = None  # why it FAILED

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
