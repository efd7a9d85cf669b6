"""Parsing TensorRT-LLM-shaped Triton inputs and building outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trt_disagg.contract import Guide, GuideType, RequestType, Role, TensorName
from trt_disagg.triton.tensors import RequestParseError, output_arrays, parse_request


def inputs(**extra):
    base = {TensorName.INPUT_IDS: np.array([[5, 6, 7, 8]], dtype=np.int32),
            TensorName.INPUT_LENGTHS: np.array([[3]], dtype=np.int32),
            TensorName.REQUEST_OUTPUT_LEN: np.array([[9]], dtype=np.int32)}
    base.update(extra)
    return base


def test_parse_trtllm_shapes_and_parameters():
    req = parse_request(inputs(**{TensorName.STREAMING: np.array([[True]]),
                                  TensorName.END_ID: np.array([[2]], dtype=np.int32),
                                  TensorName.CONTEXT_PHASE_PARAMS: np.frombuffer(b"TDKVxx", dtype=np.uint8)}),
                        json.dumps({"request_type": "generation_only"}), "id-1", Role.DECODE)
    assert req.prompt_ids == [5, 6, 7] and req.sampling.max_new_tokens == 9 and req.sampling.end_id == 2
    assert req.request_type is RequestType.GENERATION_ONLY and req.streaming
    assert req.context_phase_params == b"TDKVxx"


def test_request_type_defaults_to_the_role():
    assert parse_request(inputs(), None, "", Role.PREFILL).request_type is RequestType.CONTEXT_ONLY
    assert parse_request(inputs(), "{}", "", Role.COLOCATED).request_type is RequestType.CONTEXT_AND_GENERATION


@pytest.mark.parametrize("bad, match", [
    ({TensorName.INPUT_LENGTHS: np.array([[7]], dtype=np.int32)}, "input_lengths"),
    ({TensorName.REQUEST_OUTPUT_LEN: np.array([[1, 2]], dtype=np.int32)}, "request_output_len"),
])
def test_bad_inputs_name_the_tensor(bad, match):
    with pytest.raises(RequestParseError, match=match):
        parse_request(inputs(**bad), None, "", Role.COLOCATED)


def test_bad_request_type_names_the_parameter():
    with pytest.raises(RequestParseError, match="request_type"):
        parse_request(inputs(), {"request_type": "both"}, "", Role.COLOCATED)


def test_output_shapes():
    out = output_arrays([1, 2, 3], b"\x01\x02")
    assert out[TensorName.OUTPUT_IDS].shape == (1, 1, 3) and out[TensorName.OUTPUT_IDS].dtype == np.int32
    assert out[TensorName.SEQUENCE_LENGTH].tolist() == [[3]]
    assert out[TensorName.CONTEXT_PHASE_PARAMS].tobytes() == b"\x01\x02"
    assert out[TensorName.CONTEXT_PHASE_PARAMS].shape == (2,)  # UINT8 [L], as contract.py says
    assert TensorName.CONTEXT_PHASE_PARAMS not in output_arrays([4], None)


def test_request_output_len_is_required():
    with pytest.raises(RequestParseError, match="request_output_len is required"):
        parse_request({TensorName.INPUT_IDS: np.array([[5, 6]], dtype=np.int32)}, None, "", Role.COLOCATED)


@pytest.mark.parametrize("name, value, match", [
    (TensorName.TEMPERATURE, float("nan"), "temperature"),
    (TensorName.TEMPERATURE, float("inf"), "temperature"),
    (TensorName.TOP_P, float("nan"), "top_p"),
    (TensorName.TOP_P, 0.0, "top_p"),
])
def test_non_finite_sampling_values_are_refused(name, value, match):
    with pytest.raises(RequestParseError, match=match):
        parse_request(inputs(**{name: np.array([[value]], dtype=np.float32)}), None, "", Role.COLOCATED)


def test_a_tiny_temperature_is_accepted_as_greedy():
    req = parse_request(inputs(**{TensorName.TEMPERATURE: np.array([[1e-40]], dtype=np.float32)}), None, "",
                        Role.COLOCATED)
    assert req.sampling.greedy


def test_guided_decoding_inputs_are_tensorrt_llms():
    guide = {TensorName.GUIDE_TYPE: np.array([[b"json_schema"]], dtype=object),
             TensorName.GUIDE: np.array([[b'{"type": "object"}']], dtype=object)}
    req = parse_request(inputs(**guide), {"guided_decoding_prompt_len": 2}, "", Role.DECODE)
    assert req.sampling.guide == Guide(GuideType.JSON_SCHEMA, '{"type": "object"}', 2)
    plain = parse_request(inputs(**{TensorName.GUIDE_TYPE: np.array([[b"json"]], dtype=object)}), None, "",
                          Role.COLOCATED)
    assert plain.sampling.guide == Guide(GuideType.JSON, "", None)
    with pytest.raises(RequestParseError, match="guided_decoding_guide_type"):
        parse_request(inputs(**{TensorName.GUIDE_TYPE: np.array([[b"yaml"]], dtype=object)}), None, "", Role.COLOCATED)
    with pytest.raises(RequestParseError, match="guided_decoding_guide is required"):
        parse_request(inputs(**{TensorName.GUIDE_TYPE: np.array([[b"regex"]], dtype=object)}), None, "", Role.COLOCATED)
