"""Text ↔ token ids for the router: a small Protocol, the Hugging Face implementation, and the
incremental detokenizer that turns a token stream into text deltas.

The tokenizer comes from the engine directory (`engines/<deployment>/<role>/tokenizer/`), so the router
needs no hub access; it is loaded by the same torch-free code as the instances' (`trt_disagg.engine_dir`).
Chat requests are rendered with the tokenizer's own chat template.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from trt_disagg.engine_dir import load_tokenizer


class TextTokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_prompt_ids(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """`tools` is passed only when the template renders tools (router/structured.py, template_tools)."""


class HFTokenizer:
    """Wraps a transformers tokenizer."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.eos_token_id: int | None = tok.eos_token_id
        self.vocab_size: int = len(tok)

    @classmethod
    def from_engine_dir(cls, engine_dir: Path) -> HFTokenizer:
        return cls(load_tokenizer(engine_dir))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def decode_stream(self) -> Callable[[int], str | None] | None:
        """An incremental decoder (the `tokenizers` library's DecodeStream, in Rust: ~1 us a token against
        ~10 us for two window decodes), or None when the tokenizer is not a fast one or cleans up spaces
        (then a stream's text would differ from `decode`'s)."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None or getattr(self._tok, "clean_up_tokenization_spaces", False):
            return None
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        return lambda token: stream.step(backend, token)

    @property
    def chat_template(self) -> Any:
        """The Jinja source of the chat template (router/structured.py reads whether it renders tools)."""
        return getattr(self._tok, "chat_template", None)

    def chat_prompt_ids(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt of a chat; `tools` (OpenAI function tools) are rendered by a template that takes them."""
        out = self._tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 may return a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]


class Detokenizer:
    """Emits the text each new token adds; the deltas add up to `tokenizer.decode(all ids)`.

    With a tokenizer that offers `decode_stream()` (HFTokenizer) each token goes through that incremental
    decoder, and `flush` adds whatever it still held back (half a UTF-8 character at the very end). Otherwise
    a short window is decoded per token (not the whole output each time): `prefix` .. `read` is text already
    sent, kept as left context because a token's text can depend on its neighbour (leading spaces, merged
    bytes); a delta ending in U+FFFD (half a UTF-8 character) waits for the next token.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        factory = getattr(tokenizer, "decode_stream", None)
        self._step: Callable[[int], str | None] | None = factory() if callable(factory) else None
        self._streamed: list[str] = []

    def add(self, token: int) -> str:
        self._ids.append(token)
        if self._step is None:
            return self._delta(final=False)
        piece = self._step(token) or ""
        if piece:
            self._streamed.append(piece)
        return piece

    def flush(self) -> str:
        if self._step is None:
            return self._delta(final=True)
        sent, full = "".join(self._streamed), self._tok.decode(self._ids)
        return full[len(sent):] if full.startswith(sent) else ""

    def _delta(self, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        sent = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) <= len(sent) or (text.endswith("\ufffd") and not final):
            return ""
        delta = text[len(sent):]
        self._prefix, self._read = self._read, len(self._ids)
        return delta
