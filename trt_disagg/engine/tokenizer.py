"""Load the tokenizer that `trt-disagg build` saved next to an engine (engine_dir/tokenizer/).

Why a copy per engine: instances and the router then need no Hugging Face hub, no GGUF parsing (seconds)
and no network; the tokenizer travels with the weights it belongs to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trt_disagg.engine.types import TOKENIZER_DIR
from trt_disagg.errors import UserError


def tokenizer_dir(engine_dir: str | Path) -> Path:
    return Path(engine_dir) / TOKENIZER_DIR


def load_tokenizer(engine_dir: str | Path) -> Any:
    """The engine's transformers tokenizer, read offline from engine_dir/tokenizer."""
    from transformers import AutoTokenizer

    path = tokenizer_dir(engine_dir)
    if not path.is_dir():
        raise UserError(f"engine dir {engine_dir} has no {TOKENIZER_DIR}/ (build it with `trt-disagg build`)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
