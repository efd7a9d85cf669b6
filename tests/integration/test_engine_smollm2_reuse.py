"""SmolLM2 with block reuse: greedy tokens equal those of the same prompts without reuse, token for token,
at TP1, TP2 and PP2, for a prompt sharing a partial last block, an entirely cached prompt, a next turn of a
conversation (prompt + answer cached), and after eviction under a full pool. Every block is accounted for
(in use, cached or free) after each scenario."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.conftest import run_to_completion
from trt_disagg.contract import SamplingParams
from trt_disagg.engine.llm_engine import LLMEngine
from trt_disagg.engine.runner import make_runner
from trt_disagg.engine_dir import EngineConfig, load_tokenizer
from trt_disagg.kv_events import block_hashes

pytestmark = pytest.mark.slow

NEW = SamplingParams(max_new_tokens=8)
TPB = 16
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
POOL_TOKENS = 512
FLOOD = [f"Write note {i} about {topic}. " + "List three facts, one open question, a date, a place, a person, "
         "a number and a short quote, each on its own line, then summarise all of it in a single sentence."
         for i, topic in enumerate(["rivers", "volcanoes", "bridges", "comets", "forests", "deserts", "islands",
                                    "glaciers"])]


def small_pool_engine(engine_dir: Path, block_reuse: bool) -> LLMEngine:
    """The engine with a pool of 16 blocks of 16 (one longest sequence), so a handful of prompts fills it and
    forces evictions; the rank processes keep their larger KV tensors, of which only these slots are used."""
    cfg = EngineConfig.load(engine_dir)
    small = dataclasses.replace(cfg, kv_cache=dataclasses.replace(cfg.kv_cache, max_tokens=POOL_TOKENS))
    return LLMEngine(small, make_runner(cfg, engine_dir, cfg.threads_per_rank), block_reuse)


def chat(tok, *turns: str) -> list[int]:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return [int(t) for t in (out["input_ids"] if hasattr(out, "keys") else out)]


def assert_accounted(engine: LLMEngine) -> None:
    acc = engine.block_accounting()
    assert acc.in_use == 0 and acc.cached + acc.free == acc.total == engine.num_total_blocks
    assert len(engine.cached_block_hashes()[0]) == acc.cached


def scenario(engine: LLMEngine, tok) -> dict[str, list[int]]:
    """The same requests, one at a time, in the same order; returns tokens by name."""
    out: dict[str, list[int]] = {}

    def run(name: str, prompt: list[int]) -> list[int]:
        engine.add_request(name, prompt, NEW)
        out[name] = run_to_completion(engine)[name]
        return out[name]

    first = chat(tok, "Explain in two sentences why the sky is blue.")
    assert len(first) % TPB != 0
    answer = run("first", first)
    run("shares_partial_block", first + tok("Also, why are sunsets red?")["input_ids"])
    run("entirely_cached", first[: len(first) // TPB * TPB])
    run("same_again", first)
    said = tok.decode(answer, skip_special_tokens=True)
    run("next_turn", chat(tok, "Explain in two sentences why the sky is blue.", said, "And at night?"))
    # Its last full block (the first ones hold the chat template's system prompt, which every prompt shares).
    first_block = block_hashes(first, TPB, engine.config.fingerprint.encode())[-1]
    assert (first_block in engine.cached_block_hashes()[0]) == engine.block_reuse
    for i, text in enumerate(FLOOD):  # fills the pool: earlier prefixes are evicted
        run(f"flood{i}", chat(tok, text))
    assert first_block not in engine.cached_block_hashes()[0]  # evicted, so the next run recomputes it
    run("after_eviction", first)
    return out


def test_greedy_tokens_with_reuse_equal_without_at_tp1_tp2_pp2(smollm2_engines) -> None:
    tok = load_tokenizer(smollm2_engines[(1, 1)])
    with small_pool_engine(smollm2_engines[(1, 1)], block_reuse=False) as engine:
        reference = scenario(engine, tok)
    for layout in LAYOUTS:
        with small_pool_engine(smollm2_engines[layout], block_reuse=True) as engine:
            got = scenario(engine, tok)
            queried, matched = engine.prefix_stats()
            assert_accounted(engine)
            evicted_then_refilled = engine.block_accounting().cached
        assert matched > 0 and evicted_then_refilled > 0, layout
        for name, tokens in reference.items():
            assert got[name] == tokens, f"{name} diverged at tp{layout[0]}pp{layout[1]}"
