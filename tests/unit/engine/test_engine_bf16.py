"""bfloat16 weights and KV cache (what a GPU deployment serves) run on the CPU too, on the same code path.

The tiny engine's float32 shards are loaded as bfloat16 (the runner converts them to the config's dtype, as
a `dtype: bfloat16` build would have stored them), so no second engine is built.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from tests.conftest import run_to_completion
from trt_disagg.contract import SamplingParams
from trt_disagg.engine.llm_engine import LLMEngine
from trt_disagg.engine.runner import make_runner
from trt_disagg.engine_dir import EngineConfig

PROMPTS = [[1, 5, 9, 33, 2, 77, 100], [4, 8, 15, 16, 23, 42, 300, 301, 302, 303, 1, 2, 3, 9000, 12], [9]]
NEW_TOKENS = 12
# bf16 keeps ~3 significant digits: the tiny model's logits (|x| ~1.3) move by ~0.01 from float32's, while
# the gap between each prompt's two best tokens is 0.035-0.06: greedy tokens agree, logits within 0.05.
LOGITS_ATOL = 0.05


def _engine(engine_dir: Path, dtype: str, device: str) -> LLMEngine:
    cfg = EngineConfig.load(engine_dir)
    cfg = replace(cfg, dtype=dtype, kv_cache=replace(cfg.kv_cache, dtype=dtype))
    return LLMEngine(cfg, make_runner(cfg, engine_dir, 1, device))


def _greedy_batch(engine: LLMEngine, tag: str) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """Tokens per prompt of one mixed batch, and each prompt's first (prefill) logits, on the host."""
    first: dict[str, torch.Tensor] = {}
    engine.logits_hook = lambda ids, logits: [first.setdefault(r, logits[j].cpu())
                                              for j, r in enumerate(ids)]
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    out = run_to_completion(engine)
    engine.logits_hook = None
    return ({str(i): out[f"{tag}{i}"] for i in range(len(PROMPTS))},
            {str(i): first[f"{tag}{i}"] for i in range(len(PROMPTS))})


def test_bf16_greedy_is_stable_and_agrees_with_float32(tiny_engines, device) -> None:
    with _engine(tiny_engines[(1, 1)], "float32", device) as f32:
        ref_tokens, ref_logits = _greedy_batch(f32, "f")
    with _engine(tiny_engines[(1, 1)], "bfloat16", device) as bf16:
        tokens, logits = _greedy_batch(bf16, "a")
        again, _ = _greedy_batch(bf16, "b")  # the same engine, its cache now warm: the same tokens
        bf16.add_request("alone", PROMPTS[1], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        alone = run_to_completion(bf16)["alone"]
        assert bf16.num_free_blocks == bf16.num_total_blocks
    assert tokens == again == ref_tokens
    assert alone == tokens["1"]
    for key, ref in ref_logits.items():
        assert logits[key].dtype == torch.float32  # the engine hands sampling float32 whatever it computes in
        torch.testing.assert_close(logits[key], ref, atol=LOGITS_ATOL, rtol=0)
