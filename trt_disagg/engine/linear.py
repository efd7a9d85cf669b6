"""The engine's matmuls against weights: oneDNN's prepacked weights on the CPU, `F.linear` everywhere else.

Why not `F.linear` on the CPU: it hands fp32 to MKL's sgemm, whose path for a few rows reads the whole weight
matrix once per row. A decode step has one row per sequence and is bound by reading the weights, so on the
reference machine (AMD EPYC, one thread per rank, SmolLM2-135M's 121 weight matmuls per step) a step at
batch 3 took longer than one at batch 4 (115 vs 80 ms) and batch 2 nearly twice batch 1. No latency model
that grows with the batch follows that, and the demo's predictions missed exactly where a decode ran at
batch 2-3. oneDNN reorders each weight once, at load, into its blocked layout and reads it once per call
whatever the row count (`benchmarks/linear_kernels.py` prints both side by side on this machine).

The prepacked op (`torch.ops.mkldnn._linear_pointwise`) is what torch's own CPU compiler emits for a linear
layer. It is checked against `F.linear` once per process before any weight is packed; a torch built without
oneDNN, a dtype oneDNN does not pack, or a mismatch keeps `F.linear`, so the engine's results never depend on
the op being there. CUDA always uses `F.linear` (cuBLAS has no such row-count cliff).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def prepacking_works() -> bool:
    """Whether this torch packs a weight for oneDNN and its results match `F.linear` (checked once)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        weight, rows = torch.randn(48, 32, generator=gen), torch.randn(3, 32, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        got = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
        return bool(torch.allclose(got, F.linear(rows, weight), rtol=1e-4, atol=1e-4))
    except (RuntimeError, NotImplementedError) as exc:  # a build whose oneDNN lacks the op or the layout
        log.warning("oneDNN weight prepacking unavailable, using F.linear: %s", exc)
        return False


class Linear:
    """y = x @ weight.T for a [out, in] weight, in whichever form this device multiplies fastest."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = (weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and prepacking_works())
        # The packed copy replaces the dense weight; a tied embedding keeps its own reference to the dense one.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)
