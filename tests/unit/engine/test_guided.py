"""Grammar-constrained decoding in the engine (xgrammar): the output follows a JSON schema, the grammar
state continues across the prefill → decode hand-off (the decode side replays the first token), and a
guide that cannot be served is refused when the request is added, not in the middle of a batch."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import TINY, build_engine, run_to_completion
from trt_disagg.contract import Guide, GuideType, RequestType, SamplingParams
from trt_disagg.engine.llm_engine import EngineInputError, LLMEngine
from trt_disagg.engine_dir import load_tokenizer

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"], "additionalProperties": False}
GUIDE = Guide(GuideType.JSON_SCHEMA, json.dumps(SCHEMA))
PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_engine(tmp_path_factory.mktemp("guided"), TINY)


def test_guided_output_follows_the_schema_and_continues_across_the_hand_off(engine_dir: Path) -> None:
    tok = load_tokenizer(engine_dir)
    with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=1) as engine:
        guided = SamplingParams(max_new_tokens=40, guide=GUIDE)
        engine.add_request("c", PROMPT, guided)
        colocated = run_to_completion(engine)["c"]
        text = tok.decode(colocated, skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert colocated[-1] == engine.config.shape.eos_token_id  # the grammar ended it, not the budget

        # prefill (context_only) then decode from the exported KV: the decode side rebuilds the matcher
        # from the first token and the two legs give the colocated tokens
        engine.add_request("p", PROMPT, guided, RequestType.CONTEXT_ONLY)
        first = run_to_completion(engine)["p"]
        engine.add_decode_request("d", PROMPT, first[0], engine.export_kv("p"), guided)
        engine.release_kv("p")
        assert first + run_to_completion(engine)["d"] == colocated

        # a re-prefill of prompt + generated tokens (a lost decode leg) continues from there too
        resumed = SamplingParams(max_new_tokens=40 - 3, guide=Guide(GuideType.JSON_SCHEMA, GUIDE.text, len(PROMPT)))
        engine.add_request("r", PROMPT + colocated[:3], resumed)
        assert colocated[:3] + run_to_completion(engine)["r"] == colocated
        assert engine.num_free_blocks == engine.num_total_blocks


def test_unservable_guides_are_refused_when_added(engine_dir: Path) -> None:
    with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=1) as engine:
        with pytest.raises(EngineInputError, match="does not compile"):
            engine.add_request("bad", PROMPT, SamplingParams(guide=Guide(GuideType.JSON_SCHEMA, "{not json")))
        # generated tokens that do not follow the grammar: "x" cannot start a JSON object
        x = load_tokenizer(engine_dir).encode("x", add_special_tokens=False)
        with pytest.raises(EngineInputError, match="does not follow the grammar"):
            engine.add_request("off", PROMPT + x, SamplingParams(guide=Guide(GuideType.JSON_SCHEMA, GUIDE.text,
                                                                               len(PROMPT))))
        assert not engine.has_unfinished()


def test_one_failing_sequence_ends_alone(engine_dir: Path) -> None:
    """A sequence whose sampling values turn out broken (NaN set after validation, as a value that slipped
    past it) fails alone; one at temperature 1e-40 is greedy; the sampled ones batched with them are
    untouched, token for token."""
    with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=1) as engine:
        prompts = {f"s{i}": [100 + i] + PROMPT for i in range(4)}
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, ignore_eos=True))
        engine.add_request("greedy", PROMPT, SamplingParams(max_new_tokens=6, ignore_eos=True))
        alone = run_to_completion(engine)
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, ignore_eos=True))
        engine.add_request("tiny-t", PROMPT, SamplingParams(max_new_tokens=6, temperature=1e-40, ignore_eos=True))
        broken = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True,
                                guide=Guide(GuideType.JSON_SCHEMA, GUIDE.text))
        engine.add_request("nan", PROMPT, broken)
        broken.temperature = float("nan")
        events = []
        while engine.has_unfinished():
            events.extend(engine.step())
        failed = [e for e in events if e.request_id == "nan"]
        assert len(failed) == 1 and failed[0].token_id is None and "temperature" in (failed[0].error or "")
        for rid in prompts:
            assert [e.token_id for e in events if e.request_id == rid] == alone[rid]
        assert [e.token_id for e in events if e.request_id == "tiny-t"] == alone["greedy"]
        assert engine.num_free_blocks == engine.num_total_blocks
