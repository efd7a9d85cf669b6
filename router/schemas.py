"""OpenAI-compatible request and response bodies (the subset a completion server needs).

Requests validate types and ranges here (pydantic: wrong type, missing field, absurd sampling → 400 with
the field path); limits that depend on the deployment (max_tokens against max_seq_len, prompt length
against max_input_len, the model name) are checked in `routes/` against the settings. Unknown fields are
ignored, as OpenAI's API does; features we do not serve (n > 1, echo, logprobs, best_of, penalties,
logit_bias) are refused rather than silently dropped. `stop` strings are applied to the text (router/text.py).
Completion and chunk bodies are built as plain dicts in `routes/` (OpenAI's field names): one json.dumps
per streamed token, no model construction on the per-token path.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from router.openai_params import CHAT, COMPLETIONS, refuse_unless_no_op
from router.structured import ResponseFormat, Tool, ToolChoice
from trt_disagg.contract import IGNORE_EOS_END_ID, Guide, SamplingParams

# top_p travels as FP32: a positive value below the smallest normal float32 (5e-324 is valid JSON and valid
# for OpenAI) would arrive as 0.0 and be refused; at that size it keeps only the most likely token either way.
FLOAT32_TINY = 1.1754943508222875e-38

MAX_STOP_CHARS = 256


def _json_int(v: Any) -> Any:
    """JSON Schema's integer: 7 and 7.0 are integers, `true` and "7" are not (pydantic's lax int takes them)."""
    if isinstance(v, bool) or isinstance(v, str):
        raise ValueError("must be an integer")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
INT_FIELDS = ("max_tokens", "top_k", "seed", "n", "min_tokens", "best_of", "max_completion_tokens", "top_logprobs")


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, strict=True)


class _Sampling(BaseModel):
    # strict: JSON's types, as the schema says ("1" is not a number, 1 is not `true`); integral floats are
    # integers (JSON Schema), converted by `_integers` before the strict check
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate (≥ 1)")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description="below 1e-5: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, le=100000, description="extension (vLLM, TensorRT-LLM); 0: off")
    seed: int | None = Field(default=None, ge=0, le=2**53 - 1)  # exact as a JSON number (a double)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="extension (vLLM): generate past end-of-sequence")
    min_tokens: int = Field(default=0, ge=0, description="extension (vLLM); served when it equals max_tokens "
                            "(a fixed output length, as benchmarks ask), refused below it")
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(default=None, description="up to 4 strings; the text ends before the "
                                         "first one generated (finish_reason stop)")
    # Refused unless they ask for nothing (router/openai_params.py): an answer sampled without the penalty
    # the client asked for is a wrong answer. The schema says so (0 only, {} only).
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0, description="not supported: {} only")

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", mode="before")
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_unless_no_op(COMPLETIONS, str(info.field_name), v)

    @field_validator(*INT_FIELDS, mode="before", check_fields=False)
    @classmethod
    def _integers(cls, v: Any) -> Any:
        return _json_int(v)

    @field_validator("stream", "ignore_eos", "parallel_tool_calls", mode="before", check_fields=False)
    @classmethod
    def _booleans(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, bool):  # pydantic's lax bool takes 1, "yes", "on"
            raise ValueError("must be a boolean")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        if v == "" or (isinstance(v, list) and any(not s for s in v)):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in ([v] if isinstance(v, str) else v or [])):
            # each generated token is checked against every stop string: their length bounds that work
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @model_validator(mode="after")
    def _min_tokens_supported(self) -> _Sampling:
        requested = self.requested_max_tokens
        if self.min_tokens and (requested is None or self.min_tokens < requested):
            raise ValueError("min_tokens is supported only together with max_tokens <= min_tokens "
                             "(a fixed output length); use ignore_eos for the same effect")
        return self

    def sampling(self, max_tokens: int, end_id: int | None, guide: Guide | None = None) -> SamplingParams:
        ignore_eos = self.ignore_eos or (self.min_tokens > 0 and self.min_tokens >= max_tokens)
        return SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature,
                              top_p=max(self.top_p, FLOAT32_TINY),
                              top_k=self.top_k, seed=self.seed,
                              end_id=IGNORE_EOS_END_ID if ignore_eos else end_id, ignore_eos=ignore_eos,
                              guide=guide)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _token_id(v: Any) -> Any:
    """JSON Schema's integer: 7 and 7.0, never `false` (pydantic's lax int would take a bool as 0)."""
    if isinstance(v, bool):
        raise ValueError("a token id is an integer, not a boolean")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


TokenId = Annotated[StrictInt, Field(ge=0), BeforeValidator(_token_id)]


class CompletionRequest(_Sampling):
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]) = Field(
        description="text, token ids, or a list of one text")
    echo: Literal[False] = False
    logprobs: None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: None = Field(default=None, description="not supported (no fill-in-the-middle)")

    @field_validator("suffix", "echo", "logprobs", "best_of", mode="before")
    @classmethod
    def _refused_here(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_unless_no_op(COMPLETIONS, str(info.field_name), v)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str) and len(v) != 1:
                raise ValueError("only one prompt per request is served (a list of one string)")
            if isinstance(v[0], int) and any(t < 0 for t in v):  # type: ignore[operator]
                raise ValueError("token ids must be ≥ 0")
        elif not v:
            raise ValueError("prompt must not be empty")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class AssistantToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None  # required; null in an assistant message that only has tool_calls
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an earlier answer's calls (assistant)
    tool_call_id: str | None = None  # the call a tool message answers

    def text(self) -> str:
        """What the chat template renders: the text, or an earlier answer's calls as the JSON they were
        generated as."""
        if self.content is None:
            calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in self.tool_calls or []]
            return _calls_text(calls) if calls else ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def _calls_text(calls: list[dict[str, str]]) -> str:
    def arguments(text: str) -> Any:
        try:
            return json.loads(text or "{}")
        except ValueError:
            return text

    return "\n".join(json.dumps({"name": c["name"], "arguments": arguments(c["arguments"])}) for c in calls)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = Field(default=None, description="at most one call per answer")
    # refused unless they ask for nothing (router/openai_params.py)
    top_logprobs: int | None = Field(default=None, ge=0, le=0)
    audio: None = None
    modalities: list[Literal["text"]] | None = None
    prediction: None = None
    web_search_options: None = None
    functions: None = None
    function_call: None = None
    reasoning_effort: None = None
    verbosity: None = None
    store: Literal[False] | None = None
    # accepted without effect, by design
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None

    @field_validator("logprobs", "top_logprobs", "audio", "modalities", "prediction", "web_search_options",
                     "functions", "function_call", "reasoning_effort", "verbosity", "store", mode="before")
    @classmethod
    def _refused_here(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_unless_no_op(CHAT, str(info.field_name), v)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "trt-disagg"
    # beyond OpenAI's card (vLLM's name for the first): what a client or benchmark must size requests to
    max_model_len: int | None = Field(default=None, description="prompt + output tokens (max_seq_len)")
    max_input_len: int | None = Field(default=None, description="longest prompt in tokens")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
