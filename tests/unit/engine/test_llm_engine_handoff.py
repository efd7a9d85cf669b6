"""A prefilled (context_only) request's KV leaves the paged pool at the end of its step: blocks free at
once, and a pull (`export_kv`) never waits for the engine lock that a running step holds."""

from __future__ import annotations

import torch

from tests.conftest import run_to_completion, step_in_progress
from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.engine.llm_engine import LLMEngine


def test_prefilled_kv_is_staged_and_blocks_are_free_at_once(tiny_engines, device) -> None:
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1, device=device) as engine:
        prompt = list(range(5, 45))
        engine.add_request("p", prompt, SamplingParams(max_new_tokens=4), RequestType.CONTEXT_ONLY)
        first = run_to_completion(engine)["p"]
        assert engine.num_free_blocks == engine.num_total_blocks  # staged out of the pool
        assert engine.num_held() == 1 and engine.load().pending_kv_handoffs == 1

        with step_in_progress(engine):
            kv = engine.export_kv("p")  # would block until the step ends if it needed the engine lock
        assert kv.num_tokens == len(prompt)

        # The staged copy is the prompt's KV: decoding from it equals decoding the prompt in place.
        engine.add_decode_request("d", prompt, first[0], kv, SamplingParams(max_new_tokens=4))
        engine.release_kv("p")
        imported = run_to_completion(engine)["d"]
        engine.add_request("c", prompt, SamplingParams(max_new_tokens=4))
        assert imported == run_to_completion(engine)["c"][1:]
        assert engine.num_held() == 0 and engine.num_free_blocks == engine.num_total_blocks
        assert engine.last_step is not None and engine.last_step.kind == "decode"
        shard = next(iter(kv.shards.values()))
        assert torch.is_tensor(shard) and shard.device.type == "cpu"  # KV leaves the engine on the host
