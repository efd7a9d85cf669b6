"""How the router talks to one instance: a small Protocol, and its implementation over Triton gRPC.

    prefill(p, prompt)                 unary ModelInfer, request_type=context_only
                                       -> first token + context_phase_params (the opaque KV handle)
    decode_stream(d, prompt, t1, h)    ModelStreamInfer, request_type=generation_only + context_phase_params
                                       -> tokens #2, #3, ... (the instance does not repeat t1)
    generate_stream(c, prompt)         ModelStreamInfer, request_type=context_and_generation -> tokens #1...
    cancel(instance, request_id)       cancels that request's open calls, retries included (Triton cancels
                                       the decoupled request; the instance frees its blocks)

Errors: `InstanceLost` when the instance cannot be reached or the stream breaks (the caller moves the
work elsewhere), `InstanceRejected` when it answered with an error for this request.

The implementation builds `ModelInferRequest` protos itself on a `grpc.aio` channel with tritonclient's
service stub, because tritonclient's aio `stream_infer` refuses the reserved
`triton_enable_empty_final_response` parameter, and without it a client cannot tell the end of a decoupled
stream. A stream's one request is sent with `call.write()` (no request iterator: grpc would run a task to
consume it and, when the call is cancelled at the end, format a traceback for a debug log it then drops).
Outputs are read straight from `raw_output_contents` in one pass (this runs once per token).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc

from trt_disagg.contract import (
    GUIDE_PROMPT_LEN_PARAMETER,
    INSTANCE_LOST_KINDS,
    REQUEST_TYPE_PARAMETER,
    ErrorKind,
    InstanceInfo,
    RequestType,
    SamplingParams,
    TensorName,
    parse_error_kind,
)

log = logging.getLogger(__name__)

FINAL_PARAM = "triton_final_response"
ENABLE_FINAL_PARAM = "triton_enable_empty_final_response"


class InstanceError(Exception):
    """An instance call failed; `instance_id` says which instance, `kind` what the instance said went wrong
    (None when the failure carries no instance tag: the transport failed, or the reply was malformed)."""

    def __init__(self, instance_id: str, message: str, kind: ErrorKind | None = None) -> None:
        super().__init__(f"instance {instance_id}: {message}")
        self.instance_id = instance_id
        self.kind = kind


class InstanceLost(InstanceError):
    """Unreachable, crashed, or the stream broke: retry or continue on another instance."""


class InstanceRejected(InstanceError):
    """The instance answered with an error for this request (bad handle, over capacity, bad input)."""


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    handle: bytes  # context_phase_params: opaque to the router


class InstanceClient(Protocol):
    async def prefill(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int],
                      sampling: SamplingParams) -> PrefillResult: ...

    def decode_stream(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int], first_token: int,
                      handle: bytes, sampling: SamplingParams) -> AsyncGenerator[int, None]: ...

    def generate_stream(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int],
                        sampling: SamplingParams) -> AsyncGenerator[int, None]: ...

    async def cancel(self, instance: InstanceInfo, request_id: str) -> None: ...

    async def close(self) -> None: ...


def _add_input(req: Any, name: str, datatype: str, array: np.ndarray) -> None:
    tensor = req.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    req.raw_input_contents.append(array.tobytes())


def _add_text_input(req: Any, name: str, text: str) -> None:
    """A BYTES [1,1] input: Triton's raw encoding is each element's 4-byte little-endian length, then it."""
    data = text.encode()
    tensor = req.inputs.add()
    tensor.name = name
    tensor.datatype = "BYTES"
    tensor.shape.extend([1, 1])
    req.raw_input_contents.append(len(data).to_bytes(4, "little") + data)


def build_request(model_name: str, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                  request_type: RequestType, *, streaming: bool, handle: bytes | None = None) -> Any:
    """A ModelInferRequest in the shared tensor contract (contract.TensorName)."""
    req = service_pb2.ModelInferRequest()
    req.model_name = model_name
    req.id = request_id
    i32 = np.int32
    _add_input(req, TensorName.INPUT_IDS, "INT32", np.asarray([prompt_ids], dtype=i32))
    _add_input(req, TensorName.INPUT_LENGTHS, "INT32", np.asarray([[len(prompt_ids)]], dtype=i32))
    _add_input(req, TensorName.REQUEST_OUTPUT_LEN, "INT32", np.asarray([[sampling.max_new_tokens]], dtype=i32))
    if sampling.end_id is not None:
        _add_input(req, TensorName.END_ID, "INT32", np.asarray([[sampling.end_id]], dtype=i32))
        _add_input(req, TensorName.PAD_ID, "INT32", np.asarray([[sampling.end_id]], dtype=i32))
    _add_input(req, TensorName.STREAMING, "BOOL", np.asarray([[streaming]], dtype=bool))
    _add_input(req, TensorName.TEMPERATURE, "FP32", np.asarray([[sampling.temperature]], dtype=np.float32))
    _add_input(req, TensorName.TOP_K, "INT32", np.asarray([[sampling.top_k]], dtype=i32))
    _add_input(req, TensorName.TOP_P, "FP32", np.asarray([[sampling.top_p]], dtype=np.float32))
    if sampling.seed is not None:
        _add_input(req, TensorName.RANDOM_SEED, "UINT64", np.asarray([[sampling.seed]], dtype=np.uint64))
    if handle is not None:
        _add_input(req, TensorName.CONTEXT_PHASE_PARAMS, "UINT8", np.frombuffer(handle, dtype=np.uint8))
    if sampling.guide is not None:
        _add_text_input(req, TensorName.GUIDE_TYPE, sampling.guide.type.value)
        _add_text_input(req, TensorName.GUIDE, sampling.guide.text)
        if sampling.guide.prompt_len is not None:
            req.parameters[GUIDE_PROMPT_LEN_PARAMETER].int64_param = sampling.guide.prompt_len
    req.parameters[REQUEST_TYPE_PARAMETER].string_param = request_type.value
    if streaming:
        req.parameters[ENABLE_FINAL_PARAM].bool_param = True
    return req


_INT_DTYPES = {"INT32": np.int32, "INT64": np.int64, "UINT32": np.uint32, "UINT64": np.uint64}


def _int_outputs(response: Any, names: tuple[str, ...]) -> dict[str, list[int]]:
    """The integer outputs `names` of a ModelInferResponse, flattened, in one pass over its outputs."""
    found: dict[str, list[int]] = {}
    raw = response.raw_output_contents
    for index, out in enumerate(response.outputs):
        if out.name not in names:
            continue
        dtype = _INT_DTYPES.get(out.datatype)
        if dtype is not None and index < len(raw):
            found[out.name] = np.frombuffer(raw[index], dtype=dtype).tolist()
        else:  # not sent as raw bytes (Triton always does for these types): tritonclient's general reader
            array = InferResult(response).as_numpy(out.name)
            found[out.name] = [] if array is None else [int(t) for t in array.reshape(-1)]
    return found


def output_tokens(result: InferResult | Any, prompt_ids: list[int]) -> list[int]:
    """Generated tokens of one response (an InferResult or the ModelInferResponse itself); drops the
    prompt when the instance echoes it."""
    response = result.get_response() if isinstance(result, InferResult) else result
    outputs = _int_outputs(response, (TensorName.OUTPUT_IDS, TensorName.SEQUENCE_LENGTH))
    tokens = outputs.get(TensorName.OUTPUT_IDS)
    if tokens is None:
        return []
    lengths = outputs.get(TensorName.SEQUENCE_LENGTH)
    if lengths:
        tokens = tokens[: lengths[0]]
    n = len(prompt_ids)
    if n and len(tokens) > n and tokens[:n] == prompt_ids:
        tokens = tokens[n:]
    return tokens


class TritonInstanceClient:
    """InstanceClient over Triton's gRPC API; one channel per instance endpoint, reused by all requests."""

    def __init__(self, *, prefill_timeout_s: float) -> None:
        self._prefill_timeout_s = prefill_timeout_s
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}
        self._calls: dict[str, set[Any]] = {}

    def _stub(self, instance: InstanceInfo) -> Any:
        entry = self._channels.get(instance.grpc_url)
        if entry is None:
            channel = grpc.aio.insecure_channel(instance.grpc_url, options=[
                ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
            entry = (channel, service_pb2_grpc.GRPCInferenceServiceStub(channel))
            self._channels[instance.grpc_url] = entry
        return entry[1]

    @contextmanager
    def _track(self, request_id: str, call: Any) -> Iterator[None]:
        self._calls.setdefault(request_id, set()).add(call)
        try:
            yield
        finally:
            calls = self._calls.get(request_id)
            if calls is not None:
                calls.discard(call)
                if not calls:
                    del self._calls[request_id]

    async def prefill(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int],
                      sampling: SamplingParams) -> PrefillResult:
        req = build_request(instance.model_name, request_id, prompt_ids, sampling, RequestType.CONTEXT_ONLY,
                            streaming=False)
        call = self._stub(instance).ModelInfer(req, timeout=self._prefill_timeout_s)
        with self._track(request_id, call):
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                raise _map_rpc_error(instance, exc) from None
        tokens = output_tokens(response, prompt_ids)
        params = InferResult(response).as_numpy(TensorName.CONTEXT_PHASE_PARAMS)
        if not tokens or params is None:
            raise InstanceRejected(instance.instance_id, "prefill response lacks output_ids or context_phase_params")
        return PrefillResult(first_token=tokens[0], handle=np.asarray(params, dtype=np.uint8).tobytes())

    def decode_stream(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int], first_token: int,
                      handle: bytes, sampling: SamplingParams) -> AsyncGenerator[int, None]:
        req = build_request(instance.model_name, request_id, prompt_ids, sampling, RequestType.GENERATION_ONLY,
                            streaming=True, handle=handle)
        return self._stream(instance, request_id, req, prompt_ids)

    def generate_stream(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int],
                        sampling: SamplingParams) -> AsyncGenerator[int, None]:
        req = build_request(instance.model_name, request_id, prompt_ids, sampling,
                            RequestType.CONTEXT_AND_GENERATION, streaming=True)
        return self._stream(instance, request_id, req, prompt_ids)

    async def _stream(self, instance: InstanceInfo, request_id: str, req: Any,
                      prompt_ids: list[int]) -> AsyncGenerator[int, None]:
        # Our half stays open (no done_writing): closing it early can end the stream before the tokens.
        call = self._stub(instance).ModelStreamInfer()
        with self._track(request_id, call):
            try:
                await call.write(req)
                async for response in call:
                    if response.error_message:
                        raise classify_error(instance, response.error_message, lost=False)
                    inner = response.infer_response
                    if inner.outputs:
                        for token in output_tokens(inner, prompt_ids):
                            yield token
                    if inner.parameters[FINAL_PARAM].bool_param:
                        return
                raise InstanceLost(instance.instance_id, "stream ended without a final response")
            except grpc.aio.AioRpcError as exc:
                raise _map_rpc_error(instance, exc) from None
            except asyncio.InvalidStateError:  # write() on a call that already ended (cancelled meanwhile)
                raise InstanceLost(instance.instance_id, "stream ended before the request was sent") from None
            finally:
                call.cancel()

    async def cancel(self, instance: InstanceInfo, request_id: str) -> None:
        """Cancel the request's open calls: those sent as `request_id` and as its retries' ids
        (`<request_id>-<suffix>`, router.job.Job.call_id)."""
        retries = f"{request_id}-"
        for sent_as in [k for k in self._calls if k == request_id or k.startswith(retries)]:
            for call in list(self._calls.get(sent_as, ())):
                call.cancel()

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()


def classify_error(instance: InstanceInfo, message: str, *, lost: bool) -> InstanceError:
    """Classify by the instance's tag when there is one, else by what the transport said (`lost`)."""
    kind = parse_error_kind(message)
    if kind is not None:
        cls: type[InstanceError] = InstanceLost if kind in INSTANCE_LOST_KINDS else InstanceRejected
        return cls(instance.instance_id, message, kind=kind)
    return (InstanceLost if lost else InstanceRejected)(instance.instance_id, message)


def _map_rpc_error(instance: InstanceInfo, exc: grpc.aio.AioRpcError) -> InstanceError:
    code = exc.code()
    lost = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    details = exc.details() or code.name
    return classify_error(instance, details, lost=lost)
