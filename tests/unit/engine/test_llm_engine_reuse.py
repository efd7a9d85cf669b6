"""Block reuse in the engine (tiny Llama): a reused prefix gives the logits of a full prefill, at TP and PP;
imported and generated blocks are reusable on the decode side; a flood of unique prompts evicts instead of
refusing. Every block is accounted for after each test."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import run_to_completion
from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.engine.llm_engine import LLMEngine
from trt_disagg.kv_events import KVEventKind, block_hashes

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def assert_accounted(engine: LLMEngine) -> None:
    acc = engine.block_accounting()
    assert acc.in_use == 0 and acc.cached + acc.free == acc.total == engine.num_total_blocks
    assert engine.num_free_blocks == engine.num_total_blocks
    hashes, _ = engine.cached_block_hashes()
    assert len(hashes) == acc.cached


def run_logged(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Tokens and the logits of every step of one request run alone."""
    logits: list[torch.Tensor] = []
    engine.logits_hook = lambda ids, lg: logits.append(lg[ids.index(rid)].clone()) if rid in ids else None
    engine.add_request(rid, prompt, GREEDY)
    tokens = run_to_completion(engine)[rid]
    engine.logits_hook = None
    return tokens, logits


def conversation_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(1, 900) for _ in range(37)]  # 2 full blocks of 16 + a partial one
    return [
        base,
        base + [5, 6, 7],  # shares the 2 full blocks; the partial last block is not shared
        base[:32],  # entirely cached (2 full blocks): its last block is recomputed
        base[:32] + [rng.randrange(1, 900) for _ in range(40)],
        base,  # again, after the others
    ]


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=lambda lay: f"tp{lay[0]}pp{lay[1]}")
def test_reused_prefixes_give_the_logits_of_a_full_prefill(tiny_engines, layout) -> None:
    prompts = conversation_prompts()
    results = {}
    for reuse in (False, True):
        with LLMEngine.from_engine_dir(tiny_engines[layout], threads_per_rank=1, block_reuse=reuse) as engine:
            results[reuse] = [run_logged(engine, f"r{i}", p) for i, p in enumerate(prompts)]
            reused = engine.prefix_stats()[1]
            assert_accounted(engine)
        assert (reused > 0) == reuse
    for (tok_off, lg_off), (tok_on, lg_on) in zip(results[False], results[True], strict=True):
        assert tok_on == tok_off
        for a, b in zip(lg_off, lg_on, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_prefill_computes_only_the_unmatched_suffix(tiny_engines) -> None:
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1) as engine:
        prompt = list(range(10, 60))  # 3 full blocks + 2 tokens
        run_to_completion_of(engine, "a", prompt)
        engine.add_request("b", prompt + [3, 4, 5], GREEDY)
        engine.step()
        assert engine.last_step is not None and engine.last_step.kind == "prefill"
        assert engine.last_step.reused_tokens == 48 and engine.last_step.num_tokens == len(prompt) + 3 - 48
        run_to_completion(engine)
        assert_accounted(engine)


def run_to_completion_of(engine: LLMEngine, rid: str, prompt: list[int],
                         kind: RequestType = RequestType.CONTEXT_AND_GENERATION) -> list[int]:
    engine.add_request(rid, prompt, GREEDY, kind)
    return run_to_completion(engine)[rid]


def test_imported_and_generated_blocks_are_reusable_on_the_decode_side(tiny_engines) -> None:
    """Turn 1 is prefilled elsewhere and decoded here; turn 2 (prompt + answer + more) finds turn 1's prompt
    and answer cached here, and its tokens equal a colocated run without reuse."""
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1, block_reuse=False) as prefill, \
            LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1) as decode:
        prompt = list(range(100, 140))
        long = SamplingParams(max_new_tokens=30, ignore_eos=True)
        prefill.add_request("p", prompt, long, RequestType.CONTEXT_ONLY)
        first = run_to_completion(prefill)["p"][0]
        decode.add_decode_request("d", prompt, first, prefill.export_kv("p"), long)
        prefill.release_kv("p")
        answer = [first, *run_to_completion(decode)["d"]]
        stored = [h for c in decode.drain_kv_changes() if c.kind is KVEventKind.STORED for h in c.blocks]
        full_context = prompt + answer[:-1]  # the last token's KV is never computed
        salt = decode.config.fingerprint.encode()
        assert stored == block_hashes(full_context, 16, salt)  # the imported blocks, then the generated ones

        turn2 = prompt + answer + [7, 8, 9]
        decode.add_request("t2", turn2, GREEDY)
        first_events = decode.step()
        assert decode.last_step is not None and decode.last_step.kind == "prefill"
        assert decode.last_step.reused_tokens == len(full_context) // 16 * 16
        got = [first_events[0].token_id, *run_to_completion(decode)["t2"]]
        prefill.add_request("ref", turn2, GREEDY)
        assert got == run_to_completion(prefill)["ref"]
        assert_accounted(decode)


def test_a_flood_of_unique_prompts_evicts_and_never_refuses_or_over_commits(tiny_engines) -> None:
    rng = random.Random(1)
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1) as engine:
        total = engine.num_total_blocks
        evicted = 0
        for i in range(total // 2):  # 4 full blocks each: twice the pool in prompt blocks
            prompt = [rng.randrange(1, 900) for _ in range(64)]
            engine.add_request(f"u{i}", prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
            run_to_completion(engine)
            evicted += sum(len(c.blocks) for c in engine.drain_kv_changes() if c.kind is KVEventKind.REMOVED)
        assert evicted > 0 and engine.block_accounting().cached > 0
        # Requests that together need the whole pool are all admitted at once: cached blocks make room.
        lim = engine.config.limits
        per_request = lim.max_seq_len // 16
        n = total // per_request
        assert n <= lim.max_batch_size
        long = SamplingParams(max_new_tokens=lim.max_seq_len - lim.max_input_len, ignore_eos=True)
        for i in range(n):
            engine.add_request(f"big{i}", [rng.randrange(1, 900) for _ in range(lim.max_input_len)], long)
        for _ in range(n):  # admitted within a few prefill steps (the token budget splits them)
            engine.step()
            acc = engine.block_accounting()
            assert acc.in_use + acc.cached + acc.free == total
        assert engine.block_accounting().in_use == total and engine.load().running_sequences == n
        for i in range(n):  # the point is made; their 256 decode steps would only cost time
            engine.abort(f"big{i}")
        assert_accounted(engine)
