"""The engine directory on disk: its layout, its config.json, and the tokenizer saved in it.

Written by `trt-disagg build`, read by the engine (`LLMEngine.from_engine_dir`), the Triton model, the
router (its tokenizer and limits), the planner and the benchmarks. Most readers never run the engine, so
this module needs no torch: only the contract, the standard library, and transformers' tokenizer classes
when a tokenizer is loaded.

The layout is the same shape as TensorRT-LLM's `trtllm-build` output (`config.json` + one `rank{i}.engine`
per rank):

    engines/<deployment>/<role>/
      config.json            EngineConfig.to_json(): model shape, tp, pp, build limits, KV cache, fingerprint
      rank0.safetensors ...  one weight shard per rank, rank = pp_rank * tp + tp_rank (TensorRT-LLM's order)
      tokenizer/             the tokenizer (save_pretrained), so instances and the router need no hub
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trt_disagg.contract import KVLayout, ModelShape, Role
from trt_disagg.errors import UserError

ENGINE_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"

# tokenizer_config.json's `tokenizer_class` of a tokenizer that is nothing but its tokenizer.json (what
# `save_pretrained` writes for the GGUF-derived and generic fast tokenizers).
_GENERIC_FAST_TOKENIZERS = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


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
    enable_block_reuse: bool = True  # kv_cache_config.enable_block_reuse (engine/prefix_cache.py)

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


def tokenizer_dir(engine_dir: str | Path) -> Path:
    return Path(engine_dir) / TOKENIZER_DIR


def load_tokenizer(engine_dir: str | Path) -> Any:
    """The engine's transformers tokenizer, read offline from engine_dir/tokenizer.

    A copy per engine: instances and the router then need no Hugging Face hub, no GGUF parsing (seconds)
    and no network; the tokenizer travels with the weights it belongs to.

    A generic fast tokenizer is loaded by its own class: `AutoTokenizer` would give the same object, but
    importing it imports torch (transformers' model configs), which the router must not load. Any other
    class goes through `AutoTokenizer`, which knows the model-specific ones.
    """
    path = tokenizer_dir(engine_dir)
    if not path.is_dir():
        raise UserError(f"engine dir {engine_dir} has no {TOKENIZER_DIR}/ (build it with `trt-disagg build`)")
    if _tokenizer_class(path) in _GENERIC_FAST_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _tokenizer_class(path: Path) -> str | None:
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None
