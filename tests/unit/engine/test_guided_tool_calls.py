"""Tool calls in a chat template's own syntax, in the engine: the router's structural tag (router/structured.py)
compiles with xgrammar, lets free text through until the trigger, then holds a call to its function's
schema; a forced call continues across the prefill → decode hand-off; router/tools.py reads the call back.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from router.structured import (
    CallSyntax,
    NamedToolChoice,
    TemplateTools,
    Tool,
    ToolPlan,
    guide_for,
    structural_tag,
    tool_plan,
)
from router.tools import parse_template_calls
from tests.conftest import TINY, build_engine, run_to_completion
from trt_disagg.contract import Guide, GuideType, RequestType, SamplingParams
from trt_disagg.engine.grammar import GrammarError, Grammars
from trt_disagg.engine.llm_engine import LLMEngine
from trt_disagg.engine_dir import load_tokenizer

PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}}, "required": ["city"],
          "additionalProperties": False}
WEATHER = Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}})
HERMES = TemplateTools(True, CallSyntax.HERMES)
PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_engine(tmp_path_factory.mktemp("guided-tools"), TINY)


def guide(plan: ToolPlan) -> Guide:
    g = guide_for(None, plan)
    assert g is not None and g.type is GuideType.STRUCTURAL_TAG
    return g


@pytest.mark.parametrize("syntax", list(CallSyntax))
def test_auto_takes_text_then_a_call_and_refuses_a_call_off_its_schema(engine_dir: Path, syntax: CallSyntax) -> None:
    tok = load_tokenizer(engine_dir)
    grammars = Grammars(lambda: tok, len(tok))
    plan = tool_plan([WEATHER], "auto", None, TemplateTools(True, syntax))
    key = "arguments" if syntax is CallSyntax.HERMES else "parameters"
    call = f'{{"name": "get_weather", "{key}": {{"city": "Paris"}}}}'
    answer = f"Let me look. <tool_call>\n{call}\n</tool_call>" if syntax is CallSyntax.HERMES else f"Let me look. {call}"
    state = grammars.new_state(guide(plan), tok.eos_token_id, tok.encode(answer, add_special_tokens=False))
    assert state.accept(tok.eos_token_id)  # the answer may end after the call
    parsed = parse_template_calls(answer, syntax, plan.names)
    assert parsed.content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris"})]

    plain = grammars.new_state(guide(plan), tok.eos_token_id, tok.encode("Just text.", add_special_tokens=False))
    assert plain.accept(tok.eos_token_id)  # auto: text alone is an answer
    off_schema = answer.replace("Paris", "Berlin")
    with pytest.raises(GrammarError, match="does not follow the grammar"):
        grammars.new_state(guide(plan), tok.eos_token_id, tok.encode(off_schema, add_special_tokens=False))


@pytest.mark.parametrize("syntax", list(CallSyntax))
def test_required_takes_calls_only_and_refuses_text_first(engine_dir: Path, syntax: CallSyntax) -> None:
    tok = load_tokenizer(engine_dir)
    grammars = Grammars(lambda: tok, len(tok))
    plan = tool_plan([WEATHER], "required", None, TemplateTools(True, syntax))
    key = "arguments" if syntax is CallSyntax.HERMES else "parameters"
    call = f'{{"name": "get_weather", "{key}": {{"city": "Paris"}}}}'
    answer = f"<tool_call>\n{call}\n</tool_call>" if syntax is CallSyntax.HERMES else call
    state = grammars.new_state(guide(plan), tok.eos_token_id, tok.encode(answer, add_special_tokens=False))
    assert state.accept(tok.eos_token_id)
    assert [c.name for c in parse_template_calls(answer, syntax, plan.names).calls] == ["get_weather"]
    with pytest.raises(GrammarError, match="does not follow the grammar"):  # text before the call
        grammars.new_state(guide(plan), tok.eos_token_id, tok.encode("Let me look. " + answer,
                                                                      add_special_tokens=False))


def test_a_forced_call_in_the_template_syntax_continues_across_the_hand_off(engine_dir: Path) -> None:
    tok = load_tokenizer(engine_dir)
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
    plan = tool_plan([WEATHER], named, None, HERMES)
    assert plan.mode == "forced" and structural_tag(plan)["format"]["type"] == "tag"
    params = SamplingParams(max_new_tokens=60, guide=guide(plan))
    with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=1) as engine:
        engine.add_request("c", PROMPT, params)
        colocated = run_to_completion(engine)["c"]
        assert colocated[-1] == engine.config.shape.eos_token_id  # the grammar ended it, not the budget
        parsed = parse_template_calls(tok.decode(colocated, skip_special_tokens=True), CallSyntax.HERMES, plan.names)
        assert parsed.content is None and len(parsed.calls) == 1
        jsonschema.validate(json.loads(parsed.calls[0].arguments), PARAMS)

        engine.add_request("p", PROMPT, params, RequestType.CONTEXT_ONLY)
        first = run_to_completion(engine)["p"]
        engine.add_decode_request("d", PROMPT, first[0], engine.export_kv("p"), params)
        engine.release_kv("p")
        assert first + run_to_completion(engine)["d"] == colocated
        assert engine.num_free_blocks == engine.num_total_blocks
