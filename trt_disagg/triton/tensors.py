"""Triton tensors <-> our request: parse TensorRT-LLM's inputs, build its outputs. No Triton import here.

The Python-backend model hands `{name: numpy array}` and the request parameters (a dict) to
`parse_request`; responses are built from `output_arrays`. Shapes follow TensorRT-LLM's inflight batcher:
input_ids INT32 [1,N] (or [N]), scalars [1,1] (or [1]); output_ids INT32 [1,1,T] (batch, beam, tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_disagg.contract import (
    GUIDE_PROMPT_LEN_PARAMETER,
    REQUEST_TYPE_PARAMETER,
    Guide,
    GuideType,
    RequestType,
    Role,
    SamplingParams,
    TensorName,
)


class RequestParseError(ValueError):
    """A malformed Triton request; the message names the tensor or parameter."""


@dataclass(frozen=True)
class InstanceRequest:
    """One Triton request as the instance sees it."""

    request_id: str  # Triton's request id ("" when the client gave none)
    prompt_ids: list[int]
    sampling: SamplingParams
    request_type: RequestType
    streaming: bool
    context_phase_params: bytes | None  # the KV handle (generation_only requests)


def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any:
    arr = inputs.get(name)
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise RequestParseError(f"input {name} must hold one value, got shape {list(np.asarray(arr).shape)}")
    return flat[0].item()


def parse_parameters(raw: str | dict | None) -> dict:
    """`request.parameters()` is a JSON string in the Python backend; tests pass a dict."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        out = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestParseError(f"request parameters are not JSON: {exc}") from None
    return out if isinstance(out, dict) else {}


def _text(inputs: dict[str, np.ndarray], name: str) -> str | None:
    """A BYTES [1,1] input (Triton hands the Python backend an object array of bytes)."""
    arr = inputs.get(name)
    if arr is None:
        return None
    flat = np.asarray(arr, dtype=object).reshape(-1)
    if flat.size != 1:
        raise RequestParseError(f"input {name} must hold one value, got shape {list(np.asarray(arr).shape)}")
    value = flat[0]
    try:
        return value.decode() if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise RequestParseError(f"input {name} is not UTF-8 text") from None


def parse_guide(inputs: dict[str, np.ndarray], params: dict) -> Guide | None:
    """TensorRT-LLM's guided-decoding inputs (+ our prompt-length parameter), or None when absent."""
    kind = _text(inputs, TensorName.GUIDE_TYPE)
    if not kind or kind == "none":
        return None
    try:
        guide_type = GuideType(kind)
    except ValueError:
        raise RequestParseError(f"input {TensorName.GUIDE_TYPE}={kind!r} is not one of "
                                f"{', '.join(t.value for t in GuideType)}") from None
    text = _text(inputs, TensorName.GUIDE) or ""
    if guide_type is not GuideType.JSON and not text:
        raise RequestParseError(f"input {TensorName.GUIDE} is required with {TensorName.GUIDE_TYPE}={kind}")
    raw_len = params.get(GUIDE_PROMPT_LEN_PARAMETER)
    if raw_len is not None and (isinstance(raw_len, bool) or not isinstance(raw_len, int) or raw_len < 1):
        raise RequestParseError(f"request parameter {GUIDE_PROMPT_LEN_PARAMETER} must be an integer >= 1")
    return Guide(guide_type, text, raw_len)


def parse_request(inputs: dict[str, np.ndarray], parameters: str | dict | None, request_id: str,
                  role: Role) -> InstanceRequest:
    ids = inputs.get(TensorName.INPUT_IDS)
    if ids is None:
        raise RequestParseError(f"input {TensorName.INPUT_IDS} is required")
    prompt = [int(x) for x in np.asarray(ids).reshape(-1)]
    length = _scalar(inputs, TensorName.INPUT_LENGTHS)
    if length is not None:
        if not 0 < int(length) <= len(prompt):
            raise RequestParseError(f"input {TensorName.INPUT_LENGTHS}={int(length)} but {TensorName.INPUT_IDS} "
                                    f"has {len(prompt)} tokens")
        prompt = prompt[:int(length)]
    params = parse_parameters(parameters)
    raw_type = params.get(REQUEST_TYPE_PARAMETER)
    try:
        request_type = RequestType(raw_type) if raw_type else _role_default(role)
    except ValueError:
        raise RequestParseError(f"request parameter {REQUEST_TYPE_PARAMETER}={raw_type!r} is not one of "
                                f"{', '.join(t.value for t in RequestType)}") from None
    out_len = _scalar(inputs, TensorName.REQUEST_OUTPUT_LEN)
    if out_len is None:  # declared required in config.pbtxt, as in TensorRT-LLM's
        raise RequestParseError(f"input {TensorName.REQUEST_OUTPUT_LEN} is required")
    end_id = _scalar(inputs, TensorName.END_ID)
    temperature = _scalar(inputs, TensorName.TEMPERATURE)
    top_k = _scalar(inputs, TensorName.TOP_K)
    top_p = _scalar(inputs, TensorName.TOP_P)
    seed = _scalar(inputs, TensorName.RANDOM_SEED)
    streaming = _scalar(inputs, TensorName.STREAMING)
    sampling = SamplingParams(
        max_new_tokens=int(out_len),
        temperature=float(temperature) if temperature is not None else 0.0,
        top_p=float(top_p) if top_p is not None else 1.0,
        top_k=int(top_k) if top_k is not None else 0,
        seed=int(seed) if seed is not None else None,
        end_id=int(end_id) if end_id is not None else None,
        guide=parse_guide(inputs, params),
    )
    problem = sampling.problem()
    if problem is not None:
        raise RequestParseError(problem)
    cpp = inputs.get(TensorName.CONTEXT_PHASE_PARAMS)
    blob = np.asarray(cpp, dtype=np.uint8).tobytes() if cpp is not None and np.asarray(cpp).size else None
    return InstanceRequest(request_id=request_id, prompt_ids=prompt, sampling=sampling,
                           request_type=request_type, streaming=bool(streaming) if streaming is not None else False,
                           context_phase_params=blob)


def _role_default(role: Role) -> RequestType:
    from trt_disagg.contract import ROLE_REQUEST_TYPE

    return ROLE_REQUEST_TYPE[role]


def output_arrays(token_ids: list[int], context_phase_params: bytes | None) -> dict[str, Any]:
    """The output tensors of one response (TensorRT-LLM's shapes)."""
    out: dict[str, Any] = {
        TensorName.OUTPUT_IDS: np.asarray(token_ids, dtype=np.int32).reshape(1, 1, -1),
        TensorName.SEQUENCE_LENGTH: np.asarray([[len(token_ids)]], dtype=np.int32),
    }
    if context_phase_params is not None:
        out[TensorName.CONTEXT_PHASE_PARAMS] = np.frombuffer(context_phase_params, dtype=np.uint8).copy()
    return out


def client_inputs(module: Any, prompt: list[int], n: int, handle: bytes | None = None,
                  streaming: bool = False) -> list[Any]:
    """A TensorRT-LLM-shaped request as tritonclient `InferInput`s (for tests and benchmarks).

    `module` is `tritonclient.grpc` or `tritonclient.http`: the caller imports it, so this module stays
    free of Triton imports."""
    arrays = [(TensorName.INPUT_IDS, np.asarray([prompt], np.int32), "INT32"),
              (TensorName.INPUT_LENGTHS, np.asarray([[len(prompt)]], np.int32), "INT32"),
              (TensorName.REQUEST_OUTPUT_LEN, np.asarray([[n]], np.int32), "INT32"),
              (TensorName.STREAMING, np.asarray([[streaming]], bool), "BOOL")]
    if handle is not None:
        arrays.append((TensorName.CONTEXT_PHASE_PARAMS, np.frombuffer(handle, np.uint8), "UINT8"))
    out = []
    for name, arr, dtype in arrays:
        i = module.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        out.append(i)
    return out
