"""benchmarks/linear_kernels.py: one pass is every weight matmul of an engine step, and a short run prints
both kernels' times and their ratio for each row count asked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trt_disagg.config import ModelSource
from trt_disagg.engine.linear import prepacking_works
from trt_disagg.engine.weights import peek_shape

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "linear_kernels.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("linear_kernels", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["linear_kernels"] = module
    spec.loader.exec_module(module)
    return module


def test_a_pass_is_every_weight_matmul_of_a_step() -> None:
    shape = peek_shape(ModelSource(source="gguf"))
    shapes = _load().weight_shapes(shape)
    assert len(shapes) == 4 * shape.num_layers + 1
    assert shapes[-1] == (shape.vocab_size, shape.hidden_size)
    assert shapes[0] == ((shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim, shape.hidden_size)


@pytest.mark.skipif(not prepacking_works(), reason="this torch cannot prepack for oneDNN")
def test_short_run_prints_both_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    _load().main(["--rows", "1,3", "--repeats", "1"])
    out = capsys.readouterr().out
    for rows in ("rows 1:", "rows 3:"):
        line = next(line for line in out.splitlines() if line.startswith(rows))
        assert "F.linear" in line and "prepacked" in line
    assert "F.linear / prepacked" in out
