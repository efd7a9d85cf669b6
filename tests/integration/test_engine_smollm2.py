"""The real SmolLM2-135M-Instruct: our engine's greedy tokens equal transformers' (fp32, 64 new tokens),
unsplit and split across TP2, PP2 and TP2 x PP2 rank processes."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import GGUF, LAYOUTS, run_to_completion
from trt_disagg.config import ModelSource
from trt_disagg.contract import SamplingParams
from trt_disagg.engine.llm_engine import LLMEngine
from trt_disagg.engine.weights import build_hf_reference
from trt_disagg.engine_dir import load_tokenizer

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Disaggregating prefill and decode onto separate GPUs helps because",
]
MIN_COMPARED = 40  # at least this many tokens per prompt are compared (a prompt may stop early at EOS)


@pytest.fixture(scope="module")
def prompts_and_reference(smollm2_engines):
    tok = load_tokenizer(smollm2_engines[(1, 1)])
    hf = build_hf_reference(ModelSource(**GGUF))
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    ref = []
    with torch.no_grad():
        for ids in prompt_ids:
            # Both stop at end-of-sequence: forcing a length would differ (transformers masks EOS out,
            # ignore_eos keeps it), and the natural stop is what users see.
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            ref.append(gen[0, len(ids):].tolist())
    return prompt_ids, ref


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay[0]}pp{lay[1]}")
def test_greedy_tokens_equal_transformers(smollm2_engines, prompts_and_reference, layout) -> None:
    prompt_ids, ref = prompts_and_reference
    with LLMEngine.from_engine_dir(smollm2_engines[layout]) as eng:
        for i, ids in enumerate(prompt_ids):
            eng.add_request(str(i), ids, SamplingParams(max_new_tokens=NEW_TOKENS))
        out = run_to_completion(eng)
        assert eng.num_free_blocks == eng.num_total_blocks
    assert sum(len(r) for r in ref) >= MIN_COMPARED * len(PROMPTS)
    for i in range(len(PROMPTS)):
        assert out[str(i)] == ref[i], f"prompt {i} diverged at layout {layout}"
