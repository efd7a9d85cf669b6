"""The engine's public data types: what goes in (requests), what comes out (token events, exported KV).

Engine directory layout (written by `trt-disagg build`, read by `LLMEngine.from_engine_dir`), the same shape
as TensorRT-LLM's `trtllm-build` output (`config.json` + one `rank{i}.engine` per rank):

    engines/<deployment>/<role>/
      config.json            EngineConfig.to_json(): model shape, tp, pp, build limits, KV cache, fingerprint
      rank0.safetensors ...  one weight shard per rank, rank = pp_rank * tp + tp_rank (TensorRT-LLM's order)
      tokenizer/             the tokenizer (save_pretrained), so instances and the router need no hub
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trt_disagg.contract import KVLayout, ModelShape, Role

ENGINE_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int


@dataclass(frozen=True)
class KVCacheSpec:
    dtype: str  # torch dtype name
    tokens_per_block: int
    max_tokens: int  # KV capacity of the instance in tokens (rounded down to whole blocks)

    @property
    def num_blocks(self) -> int:
        return self.max_tokens // self.tokens_per_block


@dataclass(frozen=True)
class EngineConfig:
    """Contents of an engine directory's config.json."""

    role: Role
    shape: ModelShape
    tp: int
    pp: int
    dtype: str
    limits: EngineLimits
    kv_cache: KVCacheSpec
    fingerprint: str
    threads_per_rank: int = 1
    inputs_digest: str = ""  # hash of everything the build read; equal digest -> no rebuild
    format_version: int = ENGINE_FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def kv_layout(self) -> KVLayout:
        return KVLayout(
            fingerprint=self.fingerprint,
            num_layers=self.shape.num_layers,
            num_kv_heads=self.shape.num_kv_heads,
            head_dim=self.shape.head_dim,
            dtype=self.kv_cache.dtype,
            tokens_per_block=self.kv_cache.tokens_per_block,
            tp=self.tp,
            pp=self.pp,
        )

    def to_json(self) -> str:
        d = asdict(self)
        d["role"] = self.role.value
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        d = json.loads(text)
        return cls(
            role=Role(d["role"]),
            shape=ModelShape.from_dict(d["shape"]),
            tp=d["tp"],
            pp=d["pp"],
            dtype=d["dtype"],
            limits=EngineLimits(**d["limits"]),
            kv_cache=KVCacheSpec(**d["kv_cache"]),
            fingerprint=d["fingerprint"],
            threads_per_rank=d.get("threads_per_rank", 1),
            inputs_digest=d.get("inputs_digest", ""),
            format_version=d.get("format_version", ENGINE_FORMAT_VERSION),
            extra=d.get("extra", {}),
        )

    @classmethod
    def load(cls, engine_dir: str | Path) -> EngineConfig:
        return cls.from_json((Path(engine_dir) / CONFIG_FILE).read_text())


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end_id generated
    LENGTH = "length"  # max_new_tokens reached
    PREFILL_DONE = "prefill_done"  # context_only: first token generated, KV kept for hand-off
    ABORTED = "aborted"


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


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, as returned by `LLMEngine.step()`."""

    request_id: str
    token_id: int
    finish_reason: FinishReason | None  # None while the request goes on

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ExportedKV:
    """The KV of one sequence as it leaves an engine: in the *source* layout, converted by the receiver.

    shards[rank] holds that rank's slice as a tensor [layers_of_stage, 2 (K,V), num_tokens, kv_heads/tp, head_dim]
    for the layers pp_layer_ranges(num_layers, pp)[pp_rank] and heads of tp_rank.
    """

    layout: KVLayout
    num_tokens: int
    shards: dict[int, torch.Tensor]
