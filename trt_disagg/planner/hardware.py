"""GPUs the planner knows: published peak figures, used by the roofline latency model and the memory check.

Figures are the vendors' datasheet numbers (dense, no sparsity): NVIDIA A100 datasheet (2021), H100 and
H200 datasheets (SXM5, 2023/2024), L40S datasheet (2023). `nvlink_bytes_per_s` is the per-GPU NVLink
bandwidth (one direction); L40S has no NVLink, so its intra-node link is PCIe Gen4 x16.
"""

from __future__ import annotations

from dataclasses import dataclass

from trt_disagg.errors import UserError

GB = 10**9
GIB = 2**30
TFLOPS = 10**12


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_bf16_flops: float  # dense tensor-core FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: int  # as the driver reports it (A100-80GB: 81920 MiB)
    nvlink_bytes_per_s: float  # intra-node GPU-to-GPU, one direction


GPUS: dict[str, GPUSpec] = {g.name: g for g in (
    GPUSpec("a100-40g", 312 * TFLOPS, 1555 * GB, 40 * GIB, 300 * GB),
    GPUSpec("a100-80g", 312 * TFLOPS, 2039 * GB, 80 * GIB, 300 * GB),
    GPUSpec("h100-sxm", 989 * TFLOPS, 3350 * GB, 80 * GIB, 450 * GB),
    GPUSpec("h200", 989 * TFLOPS, 4800 * GB, 140 * GIB, 450 * GB),
    GPUSpec("l40s", 362 * TFLOPS, 864 * GB, 45 * GIB, 32 * GB),
    # The CPU reference engine's host (DESIGN.md: 2 cores, 24 GiB, ~6 GB/s over /dev/shm between processes).
    # Its peak figures are rough: plan and simulate it with `--coefficients` from `trt-disagg profile`.
    GPUSpec("cpu", 0.1 * TFLOPS, 20 * GB, 24 * GIB, 6 * GB),
)}

ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "a100-40gb": "a100-40g", "h100": "h100-sxm",
           "h100-80g": "h100-sxm", "h200-141g": "h200"}


def get_gpu(name: str) -> GPUSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise UserError(f"--gpu: unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}")
    return GPUS[key]
