"""Latency coefficients from first principles when nobody has profiled the (model, GPU) pair.

Prefill is compute-bound, decode memory-bound (DistServe §2); per TP degree t on a GPU with peak F FLOP/s,
HBM bandwidth B and intra-node link bandwidth N, for a model with P parameters (W weight bytes), L layers,
hidden size h and K KV bytes per token:

    prefill  a = W/(t*B*eb) + overhead        (the weights are read once per batch)
             b = 2P/(t*F*ec) + allreduce(t)    (2 FLOPs per parameter per token; 2 all-reduces per layer)
             c = 2*L*h/(t*F*ec)                (causal attention, QK^T and AV over half the square)
    decode   a = W/(t*B*eb) + overhead + 2L*allreduce latency
             b = K/(t*B*eb)                    (every step reads each sequence's KV)
             c = 2P/(t*F*ec) + allreduce(t)    (the matmuls' per-sequence compute)

with efficiencies ec = 0.6 (compute), eb = 0.8 (bandwidth) and a 2 ms launch overhead. On A100-80GB for
OPT-13B this gives a=17.8 ms, b=0.14 ms/token for prefill and a=17.8 ms, b=5.0e-4 ms/token for decode, against
the published 18.1 ms, 0.10 ms/token and 19.9 ms, 6.3e-4 ms/token: the right size, not a calibration.
"""

from __future__ import annotations

from dataclasses import replace

from trt_disagg.planner.hardware import GPUSpec
from trt_disagg.planner.latency_model import (
    DISTSERVE_OVERHEADS,
    NO_THRESHOLD,
    Coefficients,
    LatencyModel,
    PhaseCoefficients,
)
from trt_disagg.planner.models import ModelSpec

COMPUTE_EFFICIENCY = 0.6
BANDWIDTH_EFFICIENCY = 0.8
LAUNCH_OVERHEAD_S = 2e-3
# The engine's other costs as DistServe's simulator counts them; the fixed per-iteration one is already in `a`
# (LAUNCH_OVERHEAD_S), so it is not added twice.
ROOFLINE_OVERHEADS = replace(DISTSERVE_OVERHEADS, iteration_s=0.0)
ALLREDUCE_LATENCY_S = 8e-6
DEFAULT_TPS = (1, 2, 4, 8)


def roofline_coefficients(model: ModelSpec, gpu: GPUSpec, tp: int) -> PhaseCoefficients:
    flops = tp * gpu.peak_bf16_flops * COMPUTE_EFFICIENCY
    bandwidth = tp * gpu.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY
    layers, hidden = model.shape.num_layers, model.shape.hidden_size
    weights_s = model.weight_bytes / bandwidth
    # Ring all-reduce moves 2(t-1)/t of the activations per GPU; two per layer (attention out, MLP out).
    allreduce_per_token_s = 0.0
    allreduce_fixed_s = 0.0
    if tp > 1:
        allreduce_per_token_s = (2 * layers * 2 * (tp - 1) / tp * hidden * model.dtype_bytes
                                 / gpu.nvlink_bytes_per_s)
        allreduce_fixed_s = 2 * layers * ALLREDUCE_LATENCY_S
    per_token_compute_s = 2 * model.num_params / flops
    prefill = Coefficients(weights_s + LAUNCH_OVERHEAD_S + allreduce_fixed_s,
                           per_token_compute_s + allreduce_per_token_s,
                           2 * layers * hidden / flops)
    decode = Coefficients(weights_s + LAUNCH_OVERHEAD_S + allreduce_fixed_s,
                          model.kv_bytes_per_token / bandwidth,
                          per_token_compute_s + allreduce_per_token_s)
    return PhaseCoefficients(prefill, decode, decode, NO_THRESHOLD)


def roofline_latency_model(model: ModelSpec, gpu: GPUSpec, tps: tuple[int, ...] = DEFAULT_TPS) -> LatencyModel:
    by_tp = {tp: roofline_coefficients(model, gpu, tp) for tp in tps if model.shape.num_heads % tp == 0}
    return LatencyModel(model.name, gpu.name, "roofline", by_tp, ROOFLINE_OVERHEADS)
