"""Models the planner knows by name, or any Hugging Face `config.json`: shape, parameters, KV bytes.

OPT is not Llama-family (two-matrix MLP with biases, learned positions), so its parameter count is computed
here rather than by `ModelShape.num_params`; its KV shape fits `ModelShape` (num_kv_heads = num_heads).
Shapes are from each model's published config.json (facebook/opt-*, meta-llama/Meta-Llama-3-*,
HuggingFaceTB/SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trt_disagg.contract import ModelShape
from trt_disagg.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    shape: ModelShape
    num_params: int
    hf_name: str | None = None
    dtype_bytes: int = 2  # fp16 / bf16 weights and KV

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.shape.kv_bytes_per_token(self.dtype_bytes)

    @property
    def max_seq_len(self) -> int:
        return self.shape.max_position_embeddings


def opt_spec(name: str, layers: int, hidden: int, heads: int, ffn: int, hf_name: str | None = None,
             vocab: int = 50272, max_pos: int = 2048) -> ModelSpec:
    per_layer = 4 * hidden * hidden + 4 * hidden + 2 * hidden * ffn + ffn + hidden + 4 * hidden
    params = layers * per_layer + vocab * hidden + (max_pos + 2) * hidden + 2 * hidden
    shape = ModelShape(num_layers=layers, hidden_size=hidden, intermediate_size=ffn, num_heads=heads,
                       num_kv_heads=heads, vocab_size=vocab, max_position_embeddings=max_pos)
    return ModelSpec(name, shape, params, hf_name)


def llama_spec(name: str, shape: ModelShape, hf_name: str | None = None) -> ModelSpec:
    return ModelSpec(name, shape, shape.num_params(), hf_name)


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    opt_spec("opt-13b", 40, 5120, 40, 20480, "facebook/opt-13b"),
    opt_spec("opt-66b", 64, 9216, 72, 36864, "facebook/opt-66b"),
    opt_spec("opt-175b", 96, 12288, 96, 49152, None),
    llama_spec("llama-3-8b", ModelShape(32, 4096, 14336, 32, 8, 128256, 8192, 500000.0,
                                        tie_word_embeddings=False), "meta-llama/Meta-Llama-3-8B-Instruct"),
    llama_spec("llama-3-70b", ModelShape(80, 8192, 28672, 64, 8, 128256, 8192, 500000.0,
                                         tie_word_embeddings=False), "meta-llama/Meta-Llama-3-70B-Instruct"),
    llama_spec("smollm2-135m", ModelShape(30, 576, 1536, 9, 3, 49152, 8192, 100000.0,
                                          tie_word_embeddings=True), "HuggingFaceTB/SmolLM2-135M-Instruct"),
)}


def model_from_hf_config(cfg: dict, name: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (OPT or Llama-family)."""
    try:
        if cfg.get("model_type") == "opt":
            return opt_spec(name, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]),
                            int(cfg["num_attention_heads"]), int(cfg["ffn_dim"]), None,
                            int(cfg["vocab_size"]), int(cfg.get("max_position_embeddings", 2048)))
        return llama_spec(name, ModelShape.from_hf_config(cfg))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"--model: {name} config.json lacks or has a bad field: {exc}") from None


def get_model(name_or_path: str) -> ModelSpec:
    """A known model by name (case-insensitive), or a config.json / a directory holding one."""
    key = name_or_path.lower()
    if key in MODELS:
        return MODELS[key]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"--model: {path} is not valid JSON: {exc}") from None
        return model_from_hf_config(cfg, path.parent.name or "model")
    raise UserError(f"--model: unknown model {name_or_path!r}; known: {', '.join(sorted(MODELS))}, "
                    "or a path to a Hugging Face config.json")
