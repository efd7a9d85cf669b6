"""Everything that crosses a process boundary, in one place.

The router, the Triton models (python and tensorrtllm backends), the engine, the KV transfer and the
simulator all import these names, so a renamed field breaks the build instead of production.

Tensor names and request types are TensorRT-LLM's (tensorrtllm_backend `inflight_batcher_llm`), so a
client cannot tell our CPU instances from TensorRT-LLM ones:

    inputs : input_ids INT32 [1,N], input_lengths INT32 [1,1], request_output_len INT32 [1,1],
             end_id INT32 [1,1], pad_id INT32 [1,1], streaming BOOL [1,1],
             context_phase_params UINT8 [-1] (generation_only requests),
             sampling: temperature FP32, runtime_top_k INT32, runtime_top_p FP32, random_seed UINT64
             guided decoding: guided_decoding_guide_type BYTES, guided_decoding_guide BYTES
    outputs: output_ids INT32 [1,1,T], sequence_length INT32 [1,1], context_phase_params UINT8 [-1]
    request parameter `request_type`: context_only | generation_only | context_and_generation
    request parameter `guided_decoding_prompt_len` (ours): where the guided part of input_ids starts
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field


class Role(enum.StrEnum):
    """The job an instance (and the engine built for it) does."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class ErrorKind(enum.StrEnum):
    """What went wrong on an instance: the tag in front of every error message it sends.

    An instance answers a failed request with the message "<kind>: <prose>" (Triton carries only a
    string), and the router reads the tag back (`parse_error_kind`) to decide between retrying elsewhere,
    answering the client, or giving up, without parsing prose.
    """

    BAD_REQUEST = "bad_request"  # the request itself is wrong: every instance would refuse it
    OVERLOADED = "overloaded"  # this instance has no room now: another one (or later) may
    INVALID_HANDLE = "invalid_handle"  # context_phase_params is forged, expired or for another model
    KV_TRANSFER_FAILED = "kv_transfer_failed"  # the KV pull from the prefill instance failed
    CANCELLED = "cancelled"  # the instance dropped the request (client gone, pull cancelled, aborted)
    SHUTTING_DOWN = "shutting_down"  # the instance is stopping and fails what it holds
    INTERNAL = "internal"  # the engine broke (a failed step)


# The kinds that say "the instance lost this request, not that the request is bad": a router retries them
# on another instance, exactly as when the instance cannot be reached at all.
INSTANCE_LOST_KINDS: frozenset[ErrorKind] = frozenset({
    ErrorKind.SHUTTING_DOWN, ErrorKind.INTERNAL, ErrorKind.CANCELLED,
})


def parse_error_kind(message: str) -> ErrorKind | None:
    """The kind tagged in front of an instance's error message, or None when it carries no known tag
    (the error came from the transport or from something that is not one of our instances)."""
    tag = message.split(":", 1)[0].strip()
    try:
        return ErrorKind(tag)
    except ValueError:
        return None


class RequestType(enum.StrEnum):
    """TensorRT-LLM's `request_type` request parameter."""

    CONTEXT_ONLY = "context_only"
    GENERATION_ONLY = "generation_only"
    CONTEXT_AND_GENERATION = "context_and_generation"


ROLE_REQUEST_TYPE: dict[Role, RequestType] = {
    Role.PREFILL: RequestType.CONTEXT_ONLY,
    Role.DECODE: RequestType.GENERATION_ONLY,
    Role.COLOCATED: RequestType.CONTEXT_AND_GENERATION,
}


class TensorName:
    """Triton tensor names of the shared contract (TensorRT-LLM's spelling)."""

    INPUT_IDS = "input_ids"
    INPUT_LENGTHS = "input_lengths"
    REQUEST_OUTPUT_LEN = "request_output_len"
    END_ID = "end_id"
    PAD_ID = "pad_id"
    STREAMING = "streaming"
    CONTEXT_PHASE_PARAMS = "context_phase_params"
    TEMPERATURE = "temperature"
    TOP_K = "runtime_top_k"
    TOP_P = "runtime_top_p"
    RANDOM_SEED = "random_seed"
    GUIDE_TYPE = "guided_decoding_guide_type"  # BYTES [1,1]: a GuideType value
    GUIDE = "guided_decoding_guide"  # BYTES [1,1]: the JSON schema / regex / EBNF text ("" for json)
    OUTPUT_IDS = "output_ids"
    SEQUENCE_LENGTH = "sequence_length"


REQUEST_TYPE_PARAMETER = "request_type"
# Our extension next to TensorRT-LLM's guided-decoding inputs: how many leading input_ids are the prompt.
# The grammar constrains what follows, so an instance that is handed prompt + tokens generated elsewhere
# (a decode leg, or a re-prefill after a lost one) rebuilds the grammar state from those tokens.
GUIDE_PROMPT_LEN_PARAMETER = "guided_decoding_prompt_len"

# TensorRT-LLM's way to say "ignore end-of-sequence": an end_id that no token matches.
IGNORE_EOS_END_ID = -1


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family decoder; enough to build, shard, size the KV cache and plan."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelShape:
        """From a Hugging Face `config.json` of a Llama-family model."""
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            # transformers 5 moved rope_theta into rope_parameters
            rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
        )

    def fingerprint(self, weights_digest: str) -> str:
        """Identifies model weights + shape; KV only moves between engines with equal fingerprints."""
        payload = json.dumps({"shape": self.to_dict(), "weights": weights_digest}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def balanced_ranges(n: int, parts: int) -> list[range]:
    """Split [0, n) into `parts` contiguous ranges whose sizes differ by at most one (first ones larger)."""
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def pp_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Layers owned by each pipeline stage: contiguous, the first stages take the remainder."""
    return balanced_ranges(num_layers, pp)


@dataclass(frozen=True)
class TPSlice:
    """What one tensor-parallel rank computes: whole KV groups (a KV head with its query heads) and a
    contiguous range of MLP columns. Splits are balanced, not necessarily equal: SmolLM2-135M has 3 KV
    heads, and TP2 gives its ranks 2 and 1 KV groups (TensorRT-LLM needs equal splits; see
    `tp_divides_evenly`)."""

    kv_heads: range
    q_heads: range
    mlp_columns: range


def tp_slices(shape: ModelShape, tp: int) -> list[TPSlice]:
    group = shape.num_heads // shape.num_kv_heads
    return [
        TPSlice(kv, range(kv.start * group, kv.stop * group), mlp)
        for kv, mlp in zip(balanced_ranges(shape.num_kv_heads, tp),
                           balanced_ranges(shape.intermediate_size, tp), strict=True)
    ]


def tp_divides_evenly(shape: ModelShape, tp: int) -> bool:
    return shape.num_kv_heads % tp == 0 and shape.num_heads % tp == 0 and shape.intermediate_size % tp == 0


def rank_of(tp_rank: int, pp_rank: int, tp: int) -> int:
    """TensorRT-LLM's global rank numbering: rank = pp_rank * tp_size + tp_rank."""
    return pp_rank * tp + tp_rank


@dataclass(frozen=True)
class KVLayout:
    """Describes how an engine stores KV, so the receiving side can re-slice it.

    TP splits KV heads into balanced contiguous groups (tp_slices); PP splits layers (pp_layer_ranges).
    """

    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32"
    tokens_per_block: int
    tp: int
    pp: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KVLayout:
        return cls(**d)

    def compatible_with(self, other: KVLayout) -> str | None:
        """Why KV of `self` cannot be converted into `other`, or None when it can."""
        if self.fingerprint != other.fingerprint:
            return f"model fingerprint mismatch: {self.fingerprint} != {other.fingerprint}"
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} mismatch: {getattr(self, name)} != {getattr(other, name)}"
        return None


class GuideType(enum.StrEnum):
    """TensorRT-LLM's `guided_decoding_guide_type` values (xgrammar compiles each kind)."""

    JSON = "json"  # any JSON value (OpenAI's response_format json_object)
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    EBNF_GRAMMAR = "ebnf_grammar"
    STRUCTURAL_TAG = "structural_tag"  # xgrammar's structural tag (JSON): free text, then tool calls on a trigger


@dataclass(frozen=True)
class Guide:
    """A grammar the generated tokens must follow (structured output, tool calls)."""

    type: GuideType
    text: str  # the JSON schema / regex / EBNF grammar; "" for GuideType.JSON
    prompt_len: int | None = None  # tokens of the request's own prompt; None: all of input_ids


# Below this a temperature is greedy: logits / 1e-40 overflows to inf and the softmax to NaN, and the
# distribution it asks for is an argmax anyway.
GREEDY_TEMPERATURE = 1e-5


def sampling_problem(temperature: float, top_p: float, top_k: int) -> str | None:
    """Why these sampling values cannot be served, or None. Checked by the router, the instance and the
    engine alike, so a request that skips one boundary is still refused at the next."""
    if not math.isfinite(temperature) or temperature < 0:
        return f"temperature must be a finite number >= 0, got {temperature}"
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        return f"top_p must be in (0, 1], got {top_p}"
    if top_k < 0:
        return f"top_k must be >= 0, got {top_k}"
    return None


@dataclass
class SamplingParams:
    """Per-request decoding controls. temperature below GREEDY_TEMPERATURE (or top_k 1) means greedy."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    end_id: int | None = None
    ignore_eos: bool = False
    guide: Guide | None = None  # constrained decoding (None: free text)

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE or self.top_k == 1

    def problem(self) -> str | None:
        return sampling_problem(self.temperature, self.top_p, self.top_k)


@dataclass
class InstanceLoad:
    """Load figures an instance publishes for the router (and the simulator's dispatcher)."""

    queued_prompt_tokens: int = 0
    running_sequences: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    pending_kv_handoffs: int = 0


@dataclass
class InstanceInfo:
    """What an instance registers in Redis."""

    instance_id: str
    role: Role
    host: str
    grpc_url: str
    http_url: str
    kv_url: str
    tp: int
    pp: int
    kv_capacity_tokens: int
    fingerprint: str
    model_name: str
    extra: dict = field(default_factory=dict)


# ---- the registry's JSON (trt_disagg.keys names where it lives) --------------------------------------------
# Written by the instance (triton.registry.Registrar), read by the router (registry_read) and tools: one
# codec, so both sides agree on the field names.


def encode_info(info: InstanceInfo) -> str:
    d = asdict(info)
    d["role"] = Role(info.role).value
    return json.dumps(d, sort_keys=True)


def decode_info(raw: str | bytes) -> InstanceInfo:
    d = json.loads(raw)
    d["role"] = Role(d["role"])
    return InstanceInfo(**d)


def encode_load(load: InstanceLoad) -> str:
    return json.dumps(asdict(load), sort_keys=True)


def decode_load(raw: str | bytes) -> InstanceLoad:
    """Fields this side does not know are dropped: an instance of a newer version may publish more."""
    known = InstanceLoad.__dataclass_fields__
    return InstanceLoad(**{k: v for k, v in json.loads(raw).items() if k in known})
