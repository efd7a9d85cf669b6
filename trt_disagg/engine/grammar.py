"""Grammar-constrained decoding with xgrammar (TensorRT-LLM's guided-decoding backend).

    Guide (type, text, prompt_len) ──compile (cached)──▶ CompiledGrammar ──▶ GuidedState (one matcher
    per sequence) ── replay the tokens already generated ──▶ per step: bitmask row ──▶ logits of tokens
    the grammar forbids set to -inf ──▶ sampler ──▶ accept the sampled token

The matcher state is never shipped between instances: a decode instance (or a prefill instance that
re-prefills prompt + generated tokens after a lost decode leg) rebuilds it by replaying the tokens after
`Guide.prompt_len`. Replaying is the same walk the grammar took on the first instance, so the state is
the same.

`Grammars` loads the engine's tokenizer and builds xgrammar's tokenizer info on the first guided
request (~0.3 s for a 49k vocabulary), not at start-up: an engine that never sees one pays nothing.
Compiled grammars are cached by (type, text). A structural tag (tool calls under `tool_choice` auto with a
chat template that renders tools) is free text until a trigger such as `<tool_call>`, then one function's
arguments under its JSON schema; the router writes it, the engine only compiles it. JSON schemas compile without free whitespace
(`any_whitespace=False`): the output is compact JSON, and a small model cannot wander into whitespace
until its token budget is spent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trt_disagg.contract import Guide, GuideType


class GrammarError(ValueError):
    """The guide cannot be served: xgrammar is missing, the grammar does not compile, or the tokens
    already generated do not follow it."""


class GuidedState:
    """One sequence's grammar matcher."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def replay(self, tokens: Sequence[int]) -> None:
        for i, token in enumerate(tokens):
            if not self._matcher.accept_token(int(token)):
                raise GrammarError(f"token {i} of the output so far ({token}) does not follow the grammar")

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(int(token)))

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class Grammars:
    """Compiles guides for one engine's vocabulary; thread-safe (requests arrive on Triton's threads)."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int) -> None:
        self._load_tokenizer = load_tokenizer
        self._vocab_size = vocab_size
        self._compiler: Any = None
        self._cache: dict[tuple[GuideType, str], Any] = {}
        self._lock = threading.Lock()

    def new_state(self, guide: Guide, stop_token: int | None, generated: Sequence[int]) -> GuidedState:
        """A matcher for `guide` that has accepted `generated` (the tokens after the prompt so far)."""
        xgr = _xgrammar()
        compiled = self._compiled(guide)
        stops = [stop_token] if stop_token is not None and stop_token >= 0 else None
        state = GuidedState(xgr.GrammarMatcher(compiled, override_stop_tokens=stops))
        state.replay(generated)
        return state

    def _compiled(self, guide: Guide) -> Any:
        key = (guide.type, guide.text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            compiler = self._get_compiler()
            try:
                compiled = _compile(compiler, guide)
            except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own types
                raise GrammarError(f"{guide.type} guide does not compile: {exc}") from None
            self._cache[key] = compiled
            return compiled

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgrammar()
            tokenizer = self._load_tokenizer()
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler


def _compile(compiler: Any, guide: Guide) -> Any:
    if guide.type is GuideType.JSON:
        return compiler.compile_builtin_json_grammar()
    if guide.type is GuideType.JSON_SCHEMA:
        return compiler.compile_json_schema(guide.text, any_whitespace=False, strict_mode=True)
    if guide.type is GuideType.REGEX:
        return compiler.compile_regex(guide.text)
    if guide.type is GuideType.STRUCTURAL_TAG:
        return compiler.compile_structural_tag(guide.text)
    return compiler.compile_grammar(guide.text)


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise GrammarError("guided decoding needs the xgrammar package on this instance") from None
    return xgrammar


def apply_masks(logits: torch.Tensor, states: Sequence[GuidedState | None]) -> dict[int, str]:
    """Set the logits of tokens each row's grammar forbids to -inf, in place; rows without a state are
    left alone. Returns the rows whose grammar failed (their own error, the other rows are masked)."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return {}
    xgr = _xgrammar()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(states), vocab)
    errors: dict[int, str] = {}
    for i, state in enumerate(states):
        if state is None:
            continue
        try:
            state.fill(bitmask, i)
        except Exception as exc:
            errors[i] = f"the grammar matcher failed: {exc}"
    masked = [i for i in rows if i not in errors]
    if masked:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab, indices=masked)
    return errors
