"""Client helpers for the instance integration tests: TensorRT-LLM-shaped requests over gRPC and HTTP."""

from __future__ import annotations

import queue
from dataclasses import dataclass

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from trt_disagg.contract import TensorName
from trt_disagg.triton.tensors import client_inputs as inputs

RESPONSE_TIMEOUT_S = 120.0


def tokens_of(result) -> list[int]:
    ids = result.as_numpy(TensorName.OUTPUT_IDS)
    return [] if ids is None else [int(t) for t in ids.reshape(-1)]


def prefill(client, module, prompt: list[int], n: int) -> tuple[int, bytes]:
    """Unary infer on the prefill model (gRPC or HTTP client): first token and the handle."""
    r = client.infer("prefill", inputs(module, prompt, n), parameters={"request_type": "context_only"})
    (first,) = tokens_of(r)
    return first, r.as_numpy(TensorName.CONTEXT_PHASE_PARAMS).tobytes()


def http_generate(url: str, model: str, prompt: list[int], n: int, handle: bytes | None = None,
                  request_type: str = "generation_only") -> list[int]:
    """Non-decoupled decode/colocated over HTTP: one response with every token."""
    client = httpclient.InferenceServerClient(url)
    try:
        r = client.infer(model, inputs(httpclient, prompt, n, handle), parameters={"request_type": request_type})
        return tokens_of(r)
    finally:
        client.close()


@dataclass
class StreamResult:
    tokens: list[int]
    error: str | None


def grpc_stream(url: str, model: str, prompt: list[int], n: int, handle: bytes | None = None,
                request_type: str = "generation_only", cancel_after: int | None = None) -> StreamResult:
    """Streaming infer on a decoupled model until the final response (or an error)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    tokens: list[int] = []
    # Stopping with cancel_requests=True leaves tritonclient's request-feeding thread blocked for good (it
    # is only woken by the end marker that a graceful stop enqueues), so the stream is stopped gracefully
    # unless the test cancels the request on purpose.
    cancel = True
    try:
        client.async_stream_infer(model, inputs(grpcclient, prompt, n, handle, streaming=True),
                                  parameters={"request_type": request_type}, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=RESPONSE_TIMEOUT_S)
            if error is not None:
                cancel = False  # the request is over (an error is its final response)
                return StreamResult(tokens, str(error))
            tokens.extend(tokens_of(result))
            if cancel_after is not None and len(tokens) >= cancel_after:
                return StreamResult(tokens, "cancelled by the test")
            if result.get_response().parameters["triton_final_response"].bool_param:
                cancel = False
                return StreamResult(tokens, None)
    finally:
        client.stop_stream(cancel_requests=cancel)
        client.close()
