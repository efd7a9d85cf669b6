"""Fixtures for the build tests: the tiny deployment, and the tiny model loaded once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.engine_build.build_support import LoadCounter, deep_update, tiny_config_dict
from trt_disagg.config import Deployment, ModelSource, parse_deployment
from trt_disagg.engine.weights import LoadedModel, load_source
from trt_disagg.engine_build import builder


@pytest.fixture
def make_dep(tmp_path: Path) -> Callable[..., Deployment]:
    """tiny.yaml with overrides (a None value removes the key), engines under tmp_path/engines."""

    def make(**overrides: Any) -> Deployment:
        data = deep_update(tiny_config_dict(), overrides)
        data["engines_dir"] = str(tmp_path / "engines")
        return parse_deployment(data, "tiny-test")

    return make


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return load_source(ModelSource(source="tiny", seed=0))


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch, tiny_model: LoadedModel) -> LoadCounter:
    """Counts source loads and serves the session's tiny model (loading it once keeps the tests fast)."""
    counter = LoadCounter(tiny_model)
    monkeypatch.setattr(builder, "load_source", counter)
    return counter
