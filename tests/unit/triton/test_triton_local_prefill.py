"""A decode instance serves context_and_generation too: the router's local prefill of a short suffix when
the instance already holds the rest of the prompt (conditional disaggregation by overlap)."""

from __future__ import annotations

from tests.unit.triton.test_triton_instance import Recorder, request
from trt_disagg.contract import ErrorKind, RequestType, Role
from trt_disagg.kv.handle import new_secret
from trt_disagg.triton.fake_engine import FakeEngine
from trt_disagg.triton.instance import InstanceServer


def test_a_decode_instance_prefills_and_decodes_locally_like_a_colocated_one() -> None:
    secret = new_secret()
    decode = InstanceServer(Role.DECODE, FakeEngine(Role.DECODE, pp=2), secret)
    colocated = InstanceServer(Role.COLOCATED, FakeEngine(Role.COLOCATED), secret)
    for s in (decode, colocated):
        s.start()
    try:
        prompt = list(range(7, 40))
        local, colo = Recorder(), Recorder()
        decode.submit(request(prompt, RequestType.CONTEXT_AND_GENERATION, n=6), local)
        colocated.submit(request(prompt, RequestType.CONTEXT_AND_GENERATION, n=6), colo)
        assert not local.wait().errors and local.tokens == colo.wait().tokens and len(local.tokens) == 6
        refused = Recorder()
        decode.submit(request(prompt, RequestType.CONTEXT_ONLY), refused)  # prefill-only stays refused
        assert refused.wait().errors[0][0] is ErrorKind.BAD_REQUEST
    finally:
        for s in (decode, colocated):
            s.stop()
