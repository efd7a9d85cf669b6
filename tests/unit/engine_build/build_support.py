"""Shared helpers of the build tests (a uniquely named module: `conftest` names clash across test dirs)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from trt_disagg.config import ModelSource
from trt_disagg.engine.weights import LoadedModel

REPO = Path(__file__).resolve().parents[3]


def tiny_config_dict() -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dicts; a None value removes the key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


class LoadCounter:
    """Stands in for builder.load_source: counts calls, serves the session's tiny model."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.calls = 0

    def __call__(self, source: ModelSource) -> LoadedModel:
        assert source.source == "tiny" and source.seed == 0
        self.calls += 1
        return self.model
