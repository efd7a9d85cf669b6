"""engine/linear.py: the prepacked CPU matmul gives F.linear's results for every row count a step has (one
row per decode sequence, many per prefill), for the dtypes the engine serves, and F.linear is kept where
packing does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trt_disagg.engine import linear
from trt_disagg.engine.linear import Linear, prepacking_works


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 33])
def test_matches_f_linear(dtype: torch.dtype, tol: float, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(96, 64, generator=gen) / 8).to(dtype)
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    got = Linear(weight)(x)
    assert got.shape == (rows, 96) and got.dtype == dtype
    torch.testing.assert_close(got.float(), F.linear(x, weight).float(), rtol=tol, atol=tol)


def test_cpu_weights_are_prepacked_when_torch_can() -> None:
    layer = Linear(torch.randn(16, 8))
    assert layer.packed == prepacking_works()
    assert (layer.in_features, layer.out_features) == (8, 16)


def test_a_dtype_onednn_does_not_pack_keeps_f_linear() -> None:
    weight = torch.randn(16, 8, dtype=torch.float64)
    layer = Linear(weight)
    assert not layer.packed and layer.weight is weight
    torch.testing.assert_close(layer(torch.ones(2, 8, dtype=torch.float64)), F.linear(torch.ones(2, 8,
                               dtype=torch.float64), weight))


def test_no_prepacking_keeps_the_dense_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "prepacking_works", lambda: False)
    weight = torch.randn(16, 8)
    layer = Linear(weight)
    assert not layer.packed and layer.weight is weight
