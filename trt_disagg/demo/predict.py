"""Predicted attainment: profile the CPU engine, fit the latency model, simulate the demo's exact workload.

    engine dir ──profile (1 thread, as served)──▶ ProfileData ──fit──▶ LatencyModel (tp 1)
               ──import rounds──▶ seconds per token to write pulled KV into the pool (stalls a decode step)
    live disaggregated deployment, a few requests one at a time ──▶ hand-off latency (HandoffCosts)
    variant + latency model + hand-off costs ──▶ DisaggSpec / ColocatedSpec
    the benchmark's own requests and arrival times ──simulate──▶ attainment at each rate

The simulator sees the same arrivals (same generator, same seed) and lengths the load generator sends,
so measured and predicted differ only by what the model leaves out (the CPU the router, the load
generator and Triton take from the engines' cores, and queueing inside them).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trt_disagg.config import ServerGroup
from trt_disagg.contract import RequestType, Role, SamplingParams
from trt_disagg.demo.variants import Variant
from trt_disagg.engine_dir import EngineConfig
from trt_disagg.planner.latency_model import InstanceTiming, LatencyModel
from trt_disagg.planner.profile import ProfileFit, ProfileGrid, fit_profile, profile_engine, write_profile
from trt_disagg.sim import ColocatedPolicy, ColocatedSpec, DisaggSpec, InstanceSpec, SimWorkload, simulate
from trt_disagg.sim.result import SimResult
from trt_disagg.workload import WorkloadRequest, make_arrivals

# What `trt-disagg profile` measures for the demo: the lengths and batches the workload produces.
DEMO_GRID = ProfileGrid(batch_sizes=(1, 2, 3, 4, 6, 8), prompt_lens=(64, 256, 512), repeats=2, warmup=1,
                        decode_steps=4)
# The quick default's grid: the shortest and the longest length, fewer batches, no separate warm-up round
# (the fastest of two repeats already drops a cold first round): ~1/4 of DEMO_GRID's prefill tokens. Prefill
# time is a quadratic in the batch's tokens, and the batches spread those from 64 to 2048 anyway.
QUICK_GRID = ProfileGrid(batch_sizes=(1, 2, 4, 8), prompt_lens=(64, 512), repeats=2, warmup=0, decode_steps=4)
# KV hand-off between two processes on this host (DESIGN.md: /dev/shm ~6 GiB/s, sockets ~3-4 GiB/s).
LOCAL_KV_LINK_BYTES_PER_S = 3 * 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}


@dataclass(frozen=True)
class HandoffCosts:
    """What a KV hand-off costs on this host beyond the bytes on the link (see DisaggSpec)."""

    import_s_per_token: float  # profiled: the decode engine writing pulled KV into its pool
    handoff_s: float = 0.0  # observed on the live deployment: dispatch, pull set-up, responses


@dataclass(frozen=True)
class EngineProfile:
    fit: ProfileFit
    import_s_per_token: float


def profile(engine_dir: Path, model_name: str, threads: int, out_dir: Path,
            progress: Callable[[int, int], None] | None = None, grid: ProfileGrid = DEMO_GRID) -> EngineProfile:
    """Profile one engine as it is served (`threads` torch threads per rank) and write profile.{csv,json}."""
    from trt_disagg.engine.llm_engine import LLMEngine

    # block reuse off: the profile times compute; a prefix cache hit would time a lookup instead
    with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=threads, block_reuse=False) as engine:
        data = profile_engine(engine, grid, progress)
        fit = fit_profile(data, engine.config.tp, model_name, "cpu", f"profile:{engine_dir}")
        import_s = profile_kv_import(engine, grid.prompt_lens)
    write_profile(out_dir, data, fit, grid, str(engine_dir))
    return EngineProfile(fit, import_s)


def profile_kv_import(engine: Any, prompt_lens: Sequence[int], repeats: int = 3) -> float:
    """Seconds per token the engine spends writing pulled KV into its pool (the step's `import_s`).

    Each round prefills a prompt context-only, exports its KV and imports it back as a new decode request,
    exactly what a decode instance does with a pull; the fastest of `repeats` per length, fitted through 0.
    The import names fresh random tokens of the same length: the prompt itself would be found in this
    engine's prefix cache and not written at all (only the time is wanted; the engine is not served after).
    """
    rng = np.random.default_rng(0)
    vocab = int(engine.config.shape.vocab_size)
    best: dict[int, float] = {}
    for n in prompt_lens:
        for r in range(repeats):
            prompt = rng.integers(100, vocab, size=n).tolist()
            src, dst = f"import-src-{n}-{r}", f"import-dst-{n}-{r}"
            engine.add_request(src, prompt, SamplingParams(max_new_tokens=1), RequestType.CONTEXT_ONLY)
            first = [e for e in _run_until_idle(engine) if e.request_id == src][0].token_id
            kv = engine.export_kv(src)
            engine.release_kv(src)
            fresh = rng.integers(100, vocab, size=n).tolist()
            engine.add_decode_request(dst, fresh, first, kv, SamplingParams(max_new_tokens=2, ignore_eos=True))
            engine.step()
            stats = engine.last_step
            engine.abort(dst)
            if stats is not None and stats.imported_tokens == n:
                best[n] = min(best.get(n, float("inf")), stats.import_s)
    if not best:
        raise RuntimeError("KV import profiling saw no import step")
    return sum(best.values()) / sum(best)


def _run_until_idle(engine: Any) -> list[Any]:
    events = []
    while engine.has_unfinished():
        events.extend(engine.step())
    return events


def handoff_latency_s(observed_s: Sequence[float], input_lens: Sequence[int], spec: DisaggSpec,
                      decode_model: Callable[[int, float], float]) -> float:
    """The fixed hand-off latency: the observed prefill-done -> first decode token times of requests sent
    one at a time, less what the simulator already models (link time, import, one batch-1 decode step)."""
    rest = [obs - n * spec.kv_bytes_per_token / spec.kv_link_bytes_per_s - n * spec.import_s_per_token
            - decode_model(1, n + 1) for obs, n in zip(observed_s, input_lens, strict=True)]
    return max(0.0, statistics.median(rest))


def _instance(group: ServerGroup, cfg: EngineConfig, model: LatencyModel) -> InstanceSpec:
    timing = InstanceTiming(model.for_tp(group.tp), group.pp, cfg.shape.hidden_size, LOCAL_KV_LINK_BYTES_PER_S,
                            DTYPE_BYTES[cfg.dtype])
    return InstanceSpec(timing, cfg.kv_cache.max_tokens, group.max_batch_size, group.max_num_tokens)


def sim_spec(variant: Variant, engine_configs: dict[Role, EngineConfig], model: LatencyModel,
             handoff: HandoffCosts | None = None) -> DisaggSpec | ColocatedSpec:
    groups = variant.deployment.groups()
    if Role.COLOCATED in groups:
        g = groups[Role.COLOCATED]
        return ColocatedSpec(_instance(g, engine_configs[Role.COLOCATED], model), g.num_instances,
                             ColocatedPolicy.PREFILL_FIRST)
    p, d = groups[Role.PREFILL], groups[Role.DECODE]
    cfg = engine_configs[Role.PREFILL]
    handoff = handoff or HandoffCosts(0.0)
    return DisaggSpec(_instance(p, cfg, model), _instance(d, engine_configs[Role.DECODE], model),
                      p.num_instances, d.num_instances,
                      cfg.shape.kv_bytes_per_token(DTYPE_BYTES[cfg.kv_cache.dtype]), LOCAL_KV_LINK_BYTES_PER_S,
                      handoff_s=handoff.handoff_s, import_s_per_token=handoff.import_s_per_token)


def predict_attainment(spec: DisaggSpec | ColocatedSpec, requests: Sequence[WorkloadRequest], rates: Sequence[float],
                       ttft_s: float, tpot_s: float, *, arrival: str = "poisson", seed: int = 0) -> list[float]:
    """Simulated attainment of exactly the runs the load generator makes (same requests, same arrivals)."""
    return [simulate_run(spec, requests, rate, arrival=arrival, seed=seed).attainment(ttft_s, tpot_s)
            for rate in rates]


def simulate_run(spec: DisaggSpec | ColocatedSpec, requests: Sequence[WorkloadRequest], rate: float, *,
                 arrival: str = "poisson", seed: int = 0) -> SimResult:
    """One simulated run of exactly what the load generator sends at `rate` (same requests, same arrivals)."""
    inp = np.array([r.input_len for r in requests])
    out = np.array([r.output_len for r in requests])
    return simulate(spec, SimWorkload.from_lengths(make_arrivals(arrival, rate, len(requests), seed=seed), inp, out))


def predicted_goodput_rps(spec: DisaggSpec | ColocatedSpec, requests: Sequence[WorkloadRequest], target: float,
                          ttft_s: float, tpot_s: float, lo_rps: float, hi_rps: float, *, steps: int = 24,
                          seed: int = 0) -> float:
    """The highest rate on a geometric grid from lo_rps up whose simulated attainment reaches `target`, stopping
    at the first rate that misses it (what a measured bisection would find); 0.0 when lo_rps already misses."""
    best = 0.0
    for rate in np.geomspace(lo_rps, hi_rps, steps):
        if simulate_run(spec, requests, float(rate), seed=seed).attainment(ttft_s, tpot_s) < target:
            break
        best = float(rate)
    return best

