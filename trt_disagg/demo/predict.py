"""Predicted attainment: profile the CPU engine, fit the latency model, simulate the demo's exact workload.

    engine dir ──profile (1 thread, as served)──▶ ProfileData ──fit──▶ LatencyModel (tp 1)
    variant + latency model ──▶ DisaggSpec / ColocatedSpec
    the benchmark's own requests and arrival times ──simulate──▶ attainment at each rate

The simulator sees the same arrivals (same generator, same seed) and lengths the load generator sends,
so measured and predicted differ only by what the model leaves out (router, client and hand-off overheads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from trt_disagg.config import ServerGroup
from trt_disagg.contract import Role
from trt_disagg.demo.variants import Variant
from trt_disagg.engine.types import EngineConfig
from trt_disagg.planner.latency_model import InstanceTiming, LatencyModel
from trt_disagg.planner.profile import ProfileFit, ProfileGrid, fit_profile, profile_engine, write_profile
from trt_disagg.sim import ColocatedSpec, DisaggSpec, InstanceSpec, SimWorkload, simulate
from trt_disagg.workload import WorkloadRequest, make_arrivals

# What `trt-disagg profile` measures for the demo: the lengths and batches the workload produces.
DEMO_GRID = ProfileGrid(batch_sizes=(1, 2, 4, 8, 16), prompt_lens=(64, 256, 512), repeats=2, warmup=1,
                        decode_steps=4)
# KV hand-off between two processes on this host (DESIGN.md: /dev/shm ~6 GiB/s, sockets ~3-4 GiB/s).
LOCAL_KV_LINK_BYTES_PER_S = 3 * 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}


def profile(engine_dir: Path, model_name: str, threads: int, out_dir: Path,
            progress: Callable[[int, int], None] | None = None) -> ProfileFit:
    """Profile one engine as it is served (`threads` torch threads per rank) and write profile.{csv,json}."""
    from trt_disagg.engine.llm_engine import LLMEngine

    with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=threads) as engine:
        data = profile_engine(engine, DEMO_GRID, progress)
        fit = fit_profile(data, engine.config.tp, model_name, "cpu", f"profile:{engine_dir}")
    write_profile(out_dir, data, fit, DEMO_GRID, str(engine_dir))
    return fit


def _instance(group: ServerGroup, cfg: EngineConfig, model: LatencyModel) -> InstanceSpec:
    timing = InstanceTiming(model.for_tp(group.tp), group.pp, cfg.shape.hidden_size, LOCAL_KV_LINK_BYTES_PER_S,
                            DTYPE_BYTES[cfg.dtype])
    return InstanceSpec(timing, cfg.kv_cache.max_tokens, group.max_batch_size, group.max_num_tokens)


def sim_spec(variant: Variant, engine_configs: dict[Role, EngineConfig], model: LatencyModel) -> DisaggSpec | ColocatedSpec:
    groups = variant.deployment.groups()
    if Role.COLOCATED in groups:
        g = groups[Role.COLOCATED]
        return ColocatedSpec(_instance(g, engine_configs[Role.COLOCATED], model), g.num_instances, "prefill-first")
    p, d = groups[Role.PREFILL], groups[Role.DECODE]
    cfg = engine_configs[Role.PREFILL]
    return DisaggSpec(_instance(p, cfg, model), _instance(d, engine_configs[Role.DECODE], model),
                      p.num_instances, d.num_instances,
                      cfg.shape.kv_bytes_per_token(DTYPE_BYTES[cfg.kv_cache.dtype]), LOCAL_KV_LINK_BYTES_PER_S)


def predict_attainment(spec: DisaggSpec | ColocatedSpec, requests: Sequence[WorkloadRequest], rates: Sequence[float],
                       ttft_s: float, tpot_s: float, *, arrival: str = "poisson", seed: int = 0) -> list[float]:
    """Simulated attainment of exactly the runs the load generator makes (same requests, same arrivals)."""
    inp = np.array([r.input_len for r in requests])
    out = np.array([r.output_len for r in requests])
    return [
        simulate(spec, SimWorkload.from_lengths(make_arrivals(arrival, rate, len(requests), seed=seed), inp, out))
        .attainment(ttft_s, tpot_s)
        for rate in rates
    ]
