"""Helpers for the benchmark tests: hand-built records and the fake OpenAI server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trt_disagg.bench.fake_openai import FakeServer
from trt_disagg.config import SLO


@pytest.fixture
def slo() -> SLO:
    return SLO(ttft_s=1.0, tpot_s=0.21, attainment=0.9)


@pytest.fixture(scope="module")
def fake_server_module() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server


@pytest.fixture
def fake_server(fake_server_module: FakeServer) -> Iterator[FakeServer]:
    fake_server_module.reset()
    yield fake_server_module
    fake_server_module.reset()
