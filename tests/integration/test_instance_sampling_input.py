"""Sampling values sent straight to real instances (tritonserver, the tiny engines), past the router:

1. a bad request is INVALID_ARGUMENT over gRPC and 400 over HTTP (NaN temperature, a missing
   request_output_len), not INTERNAL / 500;
2. 8 sampled streams batched with one at temperature 1e-40 (greedy, no overflow) and one with a NaN
   temperature (refused alone): the 8 give exactly the tokens they give on their own.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.instances_helpers import StreamResult, tokens_of
from tests.integration.router_helpers import tiny
from trt_disagg.contract import TensorName
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.triton.tensors import client_inputs

pytestmark = pytest.mark.slow

PROMPTS = [[100 + 7 * i + j for j in range(24)] for i in range(8)]


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory):
    from trt_disagg.engine_build.builder import build_deployment

    root = tmp_path_factory.mktemp("tiny-sampling")
    dep = tiny().model_copy(update={"name": "tiny-sampling", "generation_servers": None})  # prefill + colocated
    build_deployment(dep, engines_root=root)
    cluster = LocalCluster(dep, engines_root=root, start_router=False, ready_timeout_s=240)
    cluster.start()
    yield cluster
    cluster.stop()


def _urls(cluster: LocalCluster) -> dict[str, tuple[str, str]]:
    return {p.instance_id: (p.grpc_url, p.http_url) for p in cluster.processes}


def sampled_inputs(module, prompt: list[int], n: int, temperature: float, seed: int, streaming: bool) -> list:
    out = client_inputs(module, prompt, n, streaming=streaming)
    for name, arr, dtype in ((TensorName.TEMPERATURE, np.asarray([[temperature]], np.float32), "FP32"),
                             (TensorName.RANDOM_SEED, np.asarray([[seed]], np.uint64), "UINT64")):
        i = module.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        out.append(i)
    return out


def stream(url: str, prompt: list[int], temperature: float, seed: int) -> StreamResult:
    results: list = []
    done = concurrent.futures.Future()  # type: ignore[var-annotated]

    def callback(result, error) -> None:
        results.append((result, error))
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            done.set_result(None)

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=callback)
    try:
        client.async_stream_infer("colocated", sampled_inputs(grpcclient, prompt, 8, temperature, seed, True),
                                  parameters={"request_type": "context_and_generation"},
                                  enable_empty_final_response=True)
        done.result(timeout=120)
    finally:
        client.stop_stream()
        client.close()
    errors = [str(e) for _, e in results if e is not None]
    tokens = [t for r, e in results if e is None for t in tokens_of(r)]
    return StreamResult(tokens, errors[0] if errors else None)


def test_bad_requests_are_invalid_argument_and_400(instances) -> None:
    grpc_url, http_url = _urls(instances)["prefill-0"]
    g = grpcclient.InferenceServerClient(grpc_url)
    with pytest.raises(InferenceServerException) as err:
        g.infer("prefill", sampled_inputs(grpcclient, PROMPTS[0], 4, float("nan"), 1, False))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "temperature" in err.value.message()
    no_len = [i for i in client_inputs(grpcclient, PROMPTS[0], 4) if i.name() != TensorName.REQUEST_OUTPUT_LEN]
    with pytest.raises(InferenceServerException) as err:
        g.infer("prefill", no_len)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "request_output_len" in err.value.message()
    h = httpclient.InferenceServerClient(http_url)
    with pytest.raises(InferenceServerException) as err:
        h.infer("prefill", sampled_inputs(httpclient, PROMPTS[0], 4, float("inf"), 1, False))
    assert err.value.status() == "400"


def test_one_bad_sequence_does_not_touch_the_batch(instances) -> None:
    grpc_url, _ = _urls(instances)["colocated-0"]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        alone = [pool.submit(stream, grpc_url, p, 1.0, 10 + i).result() for i, p in enumerate(PROMPTS)]
        together = [pool.submit(stream, grpc_url, p, 1.0, 10 + i) for i, p in enumerate(PROMPTS)]
        tiny_t = pool.submit(stream, grpc_url, PROMPTS[0], 1e-40, 0)
        nan_t = pool.submit(stream, grpc_url, PROMPTS[1], float("nan"), 0)
        batched = [f.result() for f in together]
    assert all(r.error is None and len(r.tokens) == 8 for r in alone)
    assert [r.tokens for r in batched] == [r.tokens for r in alone]
    greedy = stream(grpc_url, PROMPTS[0], 0.0, 0)
    assert tiny_t.result().error is None and tiny_t.result().tokens == greedy.tokens
    assert nan_t.result().error is not None and "temperature" in nan_t.result().error
