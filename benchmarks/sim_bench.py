"""Simulator benchmark: speed (target: 10,000 requests in <= 1 s) and the M/D/1 closed-form check.

    .venv/bin/python benchmarks/sim_bench.py [--requests 10000] [--repeats 3]

Prints measured numbers (no assertions: speed depends on the machine).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from trt_disagg.planner.latency_model import (
    Coefficients,
    InstanceTiming,
    PhaseCoefficients,
    published_latency_model,
)
from trt_disagg.planner.models import MODELS
from trt_disagg.sim import ColocatedSpec, DisaggSpec, InstanceSpec, SimWorkload, simulate
from trt_disagg.workload import load_workload, make_arrivals


def opt13b_instance(pp: int, kv_tokens: int) -> InstanceSpec:
    lm = published_latency_model("opt-13b", "a100-80g")
    assert lm is not None
    return InstanceSpec(InstanceTiming(lm.for_tp(1), pp, MODELS["opt-13b"].shape.hidden_size, 300e9), kv_tokens,
                        64 if pp == 1 else 1024)


def speed(num_requests: int, repeats: int) -> None:
    reqs = load_workload("sharegpt", num_requests=num_requests, seed=0, max_input_len=1024, max_output_len=1024)
    inputs, outputs = [r.input_len for r in reqs], [r.output_len for r in reqs]
    cases = {
        "disaggregated 1 prefill TP1 + 3 decode TP1xPP2 @ 40 req/s": (
            DisaggSpec(opt13b_instance(1, 66144), opt13b_instance(2, 150_000), 1, 3,
                       MODELS["opt-13b"].kv_bytes_per_token, 25e9), 40.0),
        "colocated vLLM-style, 8 x TP1 @ 40 req/s": (ColocatedSpec(opt13b_instance(1, 66144), 8), 40.0),
        "colocated chunked prefill, 8 x TP1 @ 40 req/s": (ColocatedSpec(opt13b_instance(1, 66144), 8, "chunked"),
                                                         40.0),
    }
    print(f"simulating {num_requests} ShareGPT requests (OPT-13B, published A100 fits), best of {repeats}:")
    for name, (spec, rate) in cases.items():
        wl = SimWorkload.from_lengths(make_arrivals("poisson", rate, num_requests, seed=1), inputs, outputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            res = simulate(spec, wl)
            times.append(time.perf_counter() - start)
        print(f"  {name}: {min(times):.3f} s  (target <= 1 s: {1.0 / min(times):.1f}x headroom); "
              f"attainment(0.25 s, 0.1 s) = {res.attainment(0.25, 0.1):.3f}, completed {res.num_completed}")


def md1() -> None:
    """One prefill instance, batch size 1, fixed service time D: M/D/1, mean wait rho*D / (2(1-rho))."""
    service_s, n = 0.05, 200_000
    coeffs = PhaseCoefficients(Coefficients(service_s, 0, 0), Coefficients(0.01, 0, 0), Coefficients(0.01, 0, 0))
    inst = InstanceSpec(InstanceTiming(coeffs, 1, 64, 1e12), 100_000, 1)
    spec = DisaggSpec(inst, inst, 1, 1, 1, 1e12)
    print(f"M/D/1 check (D = {service_s * 1e3:.0f} ms, {n} requests, prefill only):")
    for rho in (0.3, 0.5, 0.7, 0.9):
        wl = SimWorkload.from_lengths(make_arrivals("poisson", rho / service_s, n, seed=2), [64] * n, [1] * n)
        res = simulate(spec, wl, phases="prefill")
        measured = float(np.mean(res.ttft_s)) - service_s
        expected = rho * service_s / (2 * (1 - rho))
        print(f"  rho={rho}: mean wait {measured * 1e3:.2f} ms vs closed form {expected * 1e3:.2f} ms "
              f"({(measured / expected - 1) * 100:+.1f}%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    speed(args.requests, args.repeats)
    md1()


if __name__ == "__main__":
    main()
