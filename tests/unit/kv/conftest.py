"""Fixtures the KV transport tests share: a deployment secret and a fake prefill engine at TP2."""

import pytest

from trt_disagg.contract import Role
from trt_disagg.kv.handle import new_secret
from trt_disagg.triton.fake_engine import FakeEngine


@pytest.fixture
def secret():
    return new_secret()


@pytest.fixture
def prefill():
    return FakeEngine(role=Role.PREFILL, tp=2, pp=1)
