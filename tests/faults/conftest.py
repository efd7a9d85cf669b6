"""Fixtures of the fault tests: the real stack (tritonserver instances, Valkey, `trt-disagg serve`) on the
tiny engines, broken on purpose; helpers are in tests/faults/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.helpers import TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml's engines (prefill TP2, decode PP2, colocated TP1), built once."""
    from trt_disagg.config import load_deployment
    from trt_disagg.engine_build.builder import build_deployment

    root = tmp_path_factory.mktemp("tiny-faults")
    build_deployment(load_deployment(TINY_CONFIG), engines_root=root)
    return root
