"""Measured attainment: serve one variant for real and run the load generator against its router.

    write the variant's YAML ─▶ LocalCluster (Redis, one tritonserver per instance, the router) ─▶ ready
    ─▶ run_rates(router URL, the requests, each rate) ─▶ stop everything (also on error / Ctrl-C)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from trt_disagg.bench.loadgen import check_endpoint, run_rates
from trt_disagg.bench.metrics import RunResult
from trt_disagg.bench.progress import RunProgress
from trt_disagg.config import SLO, dump_deployment
from trt_disagg.demo.variants import Variant
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.workload import WorkloadRequest

log = logging.getLogger(__name__)


def measure(variant: Variant, requests: Sequence[WorkloadRequest], rates: Sequence[float], slo: SLO, *,
            engines_root: Path, run_dir: Path, arrival: str = "poisson", seed: int = 0,
            request_timeout_s: float = 120.0) -> list[RunResult]:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / f"{variant.label}.yaml"
    config_path.write_text(dump_deployment(variant.deployment))
    with LocalCluster(variant.deployment, config_path=config_path, engines_root=engines_root,
                      run_dir=run_dir / "serve") as cluster:
        url = cluster.router_url
        if url is None:
            raise RuntimeError("the router did not start; see the serve logs in " + str(run_dir / "serve"))
        log.info("%s serving at %s", variant.label, url)

        async def bench() -> list[RunResult]:
            model = await check_endpoint(url)
            with RunProgress() as bar:  # one bar per rate, advanced as each request finishes
                return await run_rates(url, model, requests, rates, slo, arrival=arrival, seed=seed,
                                       request_timeout_s=request_timeout_s, on_run=bar.on_run,
                                       on_record=bar.on_record)

        return asyncio.run(bench())
