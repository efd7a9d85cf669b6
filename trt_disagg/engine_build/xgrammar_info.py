"""xgrammar_tokenizer_info.json: the engine's vocabulary as TensorRT-LLM's guided decoding reads it.

The tensorrtllm Triton backend (C++ executor, xgrammar backend) takes `xgrammar_tokenizer_info_path`
(model_repo/tensorrtllm/*/config.pbtxt, rendered to <engine_dir>/xgrammar_tokenizer_info.json) and reads
three keys from it:

    encoded_vocab   every token's string, in id order, as the tokenizer's get_vocab() spells it
    tokenizer_str   the fast tokenizer's tokenizer.json: xgrammar detects from it how tokens map to bytes
                    (byte-level BPE, byte fallback, raw) and whether a prefix space is added
    stop_token_ids  [eos]

That is the file TensorRT-LLM's examples/generate_xgrammar_tokenizer_info.py writes; the build writes it
next to the engine so a GPU host needs no extra step. `tokenizer_info_from_file` rebuilds xgrammar's
TokenizerInfo from it the way the backend does (the vocabulary plus the metadata detected from
tokenizer_str), so a test can compare it with `TokenizerInfo.from_huggingface` of the same tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

XGRAMMAR_TOKENIZER_INFO = "xgrammar_tokenizer_info.json"  # trt_disagg.triton.render points the config at it


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """The file's content for a transformers fast tokenizer. Raises ValueError for a slow one: the backend
    needs tokenizer_str, which only a fast tokenizer has."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: guided decoding on the tensorrtllm "
                         "backend needs its tokenizer.json")
    vocab = tokenizer.get_vocab()
    encoded = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return {"encoded_vocab": encoded, "tokenizer_str": backend.to_str(), "stop_token_ids": stops}


def write_tokenizer_info(engine_dir: Path, tokenizer: Any) -> Path:
    """Write <engine_dir>/xgrammar_tokenizer_info.json; returns its path."""
    path = Path(engine_dir) / XGRAMMAR_TOKENIZER_INFO
    path.write_text(json.dumps(tokenizer_info(tokenizer)), encoding="utf-8")
    return path


def tokenizer_info_from_file(path: Path) -> Any:
    """xgrammar's TokenizerInfo as the backend builds it from the file (needs the xgrammar package)."""
    import xgrammar as xgr

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    detected = xgr.TokenizerInfo._detect_metadata_from_hf(data["tokenizer_str"])  # what the C++ side calls
    return xgr.TokenizerInfo(data["encoded_vocab"], detected["vocab_type"], stop_token_ids=data["stop_token_ids"],
                             add_prefix_space=detected["add_prefix_space"])
