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

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trt_disagg.contract import IGNORE_EOS_END_ID, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0, description="tokens to generate (≥ 1)")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=100000, description="extension (vLLM, TensorRT-LLM); 0: off")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="extension (vLLM): generate past end-of-sequence")
    min_tokens: int = Field(default=0, ge=0, description="extension (vLLM); served when it equals max_tokens "
                            "(a fixed output length, as benchmarks ask), refused below it")
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings; the text ends before the "
                                         "first one generated (finish_reason stop)")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        if v == "" or (isinstance(v, list) and any(not s for s in v)):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _penalties_unsupported(self) -> _Sampling:
        # Refused, not ignored: an answer sampled without the penalty the client asked for is a wrong answer.
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported by this deployment's "
                             "engines (leave them at 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this deployment's engines")
        return self

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

    def sampling(self, max_tokens: int, end_id: int | None) -> SamplingParams:
        ignore_eos = self.ignore_eos or (self.min_tokens > 0 and self.min_tokens >= max_tokens)
        return SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed,
                              end_id=IGNORE_EOS_END_ID if ignore_eos else end_id, ignore_eos=ignore_eos)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(description="text, token ids, or a list of one text")
    echo: Literal[False] = False
    logprobs: None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

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


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: Literal[False] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "trt-disagg"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
