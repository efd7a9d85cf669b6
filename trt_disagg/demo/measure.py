"""Measured attainment: serve one variant for real and run the load generator against its router.

    write the variant's YAML ─▶ LocalCluster (Redis, one tritonserver per instance, the router) ─▶ ready
    ─▶ disaggregated: a few requests one at a time; their Redis records time the KV hand-off
    ─▶ run_rates(router URL, the requests, each rate) ─▶ stop everything (also on error / Ctrl-C)

Every instance writes its iteration log (one JSON line per engine step) next to its Triton log, so the
report can set the served step times next to the profiled ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from trt_disagg.bench.loadgen import check_endpoint, completion_body, make_client, run_rates, send_request
from trt_disagg.bench.metrics import RequestRecord, RunResult
from trt_disagg.bench.progress import RunProgress
from trt_disagg.config import SLO, dump_deployment
from trt_disagg.contract import Role
from trt_disagg.demo.variants import Variant
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.workload import WorkloadRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measured:
    runs: list[RunResult]
    handoffs_s: list[float]  # prefill done -> first decode token, requests sent one at a time (disaggregated)
    handoff_input_lens: list[int]
    iteration_logs: list[Path]  # one JSONL per instance


def measure(variant: Variant, requests: Sequence[WorkloadRequest], rates: Sequence[float], slo: SLO, *,
            engines_root: Path, run_dir: Path, arrival: str = "poisson", seed: int = 0,
            request_timeout_s: float = 120.0, handoff_samples: int = 3) -> Measured:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / f"{variant.label}.yaml"
    config_path.write_text(dump_deployment(variant.deployment))
    disaggregated = Role.PREFILL in variant.deployment.groups()
    with LocalCluster(variant.deployment, config_path=config_path, engines_root=engines_root,
                      run_dir=run_dir / "serve", iteration_logs=True) as cluster:
        url = cluster.router_url
        if url is None:
            raise RuntimeError("the router did not start; see the serve logs in " + str(run_dir / "serve"))
        log.info("%s serving at %s", variant.label, url)

        async def bench() -> tuple[list[RunResult], list[float]]:
            model = await check_endpoint(url)
            handoffs = (await observe_handoffs(url, model, requests[:handoff_samples], request_timeout_s)
                        if disaggregated else [])
            with RunProgress() as bar:  # one bar per rate, advanced as each request finishes
                runs = await run_rates(url, model, requests, rates, slo, arrival=arrival, seed=seed,
                                       request_timeout_s=request_timeout_s, on_run=bar.on_run,
                                       on_record=bar.on_record)
            return runs, handoffs

        runs, handoffs = asyncio.run(bench())
        logs = [cluster.iteration_log_path(p.instance_id) for p in cluster.plans()]
    return Measured(runs, handoffs, [r.input_len for r in requests[:len(handoffs)]], logs)


async def observe_handoffs(url: str, model: str, requests: Sequence[WorkloadRequest],
                           timeout_s: float) -> list[float]:
    """Send each request alone (4 output tokens) and read its Redis record: PREFILL_DONE -> DECODING.

    The time between the first token (prefill) and the second (the decode instance's first step) is what a
    hand-off costs on this deployment when nothing else runs: what the simulator's `handoff_s` stands for.
    """
    base = url.rstrip("/")
    handoffs = []
    async with make_client(timeout_s) as client:
        for i, req in enumerate(requests):
            rec = RequestRecord(index=i, input_len=req.input_len, expected_output_len=4, scheduled_s=0.0, sent_s=0.0)
            await send_request(client, base, completion_body(model, replace(req, output_len=4)), rec, timeout_s)
            if not rec.ok or rec.request_id is None:
                raise RuntimeError(f"hand-off probe request failed: {rec.error or 'no request id in the stream'}")
            try:
                record = (await client.get(f"{base}/v1/requests/{rec.request_id}")).json()
                stamps = record["timestamps"]
                handoffs.append(float(stamps["DECODING"]) - float(stamps["PREFILL_DONE"]))
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                raise RuntimeError(f"no hand-off timestamps for request {rec.request_id}: {exc}") from None
    return handoffs
