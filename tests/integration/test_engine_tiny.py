"""The engine on the seeded tiny Llama, against Hugging Face transformers, in every parallel layout, on the
CPU and (where there is one) on CUDA: one code path, so the same tokens.

Slow-ish: each TP/PP layout spawns its rank processes (a few seconds each).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import LAYOUTS, TINY, need_devices, run_to_completion
from trt_disagg.config import ModelSource
from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.engine.llm_engine import EngineInputError, LLMEngine
from trt_disagg.engine.types import FinishReason
from trt_disagg.engine.weights import build_hf_reference

pytestmark = pytest.mark.slow

PROMPTS = [[1, 5, 9, 33, 2, 77, 100], [4, 8, 15, 16, 23, 42, 300, 301, 302, 303, 1, 2, 3, 9000, 12], [9]]
NEW_TOKENS = 12
LOGITS_ATOL = {"cpu": 1e-4, "cuda": 1e-3}  # float32; TP/PP and CUDA's kernels only change summation order


@pytest.fixture(scope="module")
def reference() -> dict[int, tuple[list[int], torch.Tensor]]:
    """prompt index -> (HF greedy tokens, HF logits at each generated position)."""
    hf = build_hf_reference(ModelSource(**TINY))
    out = {}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            gen = hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            tokens = gen[0, len(prompt):].tolist()
            logits = hf(gen[:, :-1]).logits[0, len(prompt) - 1:]
            out[i] = (tokens, logits)
    return out


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay[0]}pp{lay[1]}")
def test_tokens_and_logits_match_transformers(tiny_engines, reference, layout, device) -> None:
    need_devices(device, layout[0] * layout[1])
    seen: dict[str, list[torch.Tensor]] = {}
    with LLMEngine.from_engine_dir(tiny_engines[layout], device=device) as eng:
        eng.logits_hook = lambda ids, logits: [seen.setdefault(r, []).append(logits[j].cpu())
                                               for j, r in enumerate(ids)]
        for i, prompt in enumerate(PROMPTS):  # one mixed-length batch
            eng.add_request(str(i), prompt, greedy())
        out = run_to_completion(eng)
        assert eng.num_free_blocks == eng.num_total_blocks
    for i in range(len(PROMPTS)):
        tokens, ref_logits = reference[i]
        assert out[str(i)] == tokens
        ours = torch.stack(seen[str(i)])
        assert ours.shape == ref_logits.shape
        torch.testing.assert_close(ours, ref_logits, atol=LOGITS_ATOL[device], rtol=0)


@pytest.mark.parametrize("src,dst", [((2, 1), (1, 2)), ((2, 1), (1, 1)), ((1, 2), (2, 1)), ((2, 2), (1, 1))],
                         ids=lambda lay: f"tp{lay[0]}pp{lay[1]}")
def test_kv_handoff_between_layouts_gives_identical_tokens(tiny_engines, reference, src, dst, device) -> None:
    need_devices(device, max(src[0] * src[1], dst[0] * dst[1]))
    with LLMEngine.from_engine_dir(tiny_engines[src], device=device) as prefill, \
            LLMEngine.from_engine_dir(tiny_engines[dst], device=device) as decode:
        for i, prompt in enumerate(PROMPTS):
            prefill.add_request(str(i), prompt, greedy(), RequestType.CONTEXT_ONLY)
        first = {}
        while prefill.has_unfinished():
            for ev in prefill.step():
                assert ev.finish_reason is FinishReason.PREFILL_DONE
                first[ev.request_id] = ev.token_id
        assert prefill.load().pending_kv_handoffs == len(PROMPTS)
        for i, prompt in enumerate(PROMPTS):
            kv = prefill.export_kv(str(i))
            assert (kv.layout.tp, kv.layout.pp) == src
            prefill.release_kv(str(i))
            decode.add_decode_request(str(i), prompt, first[str(i)], kv, greedy())
        out = run_to_completion(decode)
        assert prefill.num_free_blocks == prefill.num_total_blocks
        assert decode.num_free_blocks == decode.num_total_blocks
    for i in range(len(PROMPTS)):
        assert [first[str(i)]] + out[str(i)] == reference[i][0]


def test_batch_equals_each_prompt_alone_and_blocks_return(tiny_engines, device) -> None:
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], device=device) as eng:
        alone = {}
        for i, prompt in enumerate(PROMPTS):
            eng.add_request(f"a{i}", prompt, greedy())
            alone[i] = run_to_completion(eng)[f"a{i}"]
        for i, prompt in enumerate(PROMPTS):
            eng.add_request(f"b{i}", prompt, greedy(NEW_TOKENS + 3 * i))  # different lengths finish apart
        batched = run_to_completion(eng)
        assert eng.num_free_blocks == eng.num_total_blocks
    for i in range(len(PROMPTS)):
        assert batched[f"b{i}"][:NEW_TOKENS] == alone[i]


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_engines, device) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], device=device) as eng:
        eng.add_request("alone", PROMPTS[0], params)
        alone = run_to_completion(eng)["alone"]
        eng.add_request("other", PROMPTS[1], greedy())
        eng.add_request("again", PROMPTS[0], params)
        assert run_to_completion(eng)["again"] == alone


def test_abort_and_release_free_every_block(tiny_engines, device) -> None:
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], device=device) as eng:
        eng.add_request("run", PROMPTS[1], greedy(50))
        eng.add_request("held", PROMPTS[0], greedy(), RequestType.CONTEXT_ONLY)
        eng.step()  # prefill both
        eng.step()  # one decode step
        assert eng.num_free_blocks < eng.num_total_blocks
        eng.abort("run")
        eng.abort("run")  # idempotent
        eng.release_kv("held")
        eng.release_kv("held")
        assert not eng.has_unfinished()
        assert eng.num_free_blocks == eng.num_total_blocks


@pytest.mark.parametrize("prompt,params,match", [
    ([1] * 300, greedy(), "max_input_len"),
    ([], greedy(), "empty"),
    ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], SamplingParams(max_new_tokens=600), "max_seq_len"),
    ([1, 10**7], greedy(), "token ids"),
    ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
])
def test_bad_requests_are_refused_clearly(tiny_engines, prompt, params, match) -> None:
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)]) as eng:
        with pytest.raises(EngineInputError, match=match):
            eng.add_request("bad", prompt, params)
        assert not eng.has_unfinished()
        assert eng.num_free_blocks == eng.num_total_blocks
