"""Measured attainment: serve one variant for real and run the load generator against its router.

    write the variant's YAML ─▶ LocalCluster (Redis, one tritonserver per instance, the router) ─▶ ready
    ─▶ disaggregated: warm-up requests (untimed: first steps, first pulls), then probes one at a time;
       their Redis records and the decode instance's log time the KV hand-off phase by phase
    ─▶ the rates: a fixed list, or a goodput search (bisection, stops early) ─▶ stop everything

Every instance writes its iteration log (one JSON line per engine step) next to its Triton log, so the
report can set the served step times next to the profiled ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from trt_disagg.bench.goodput import SearchSpec, search_rates
from trt_disagg.bench.loadgen import check_endpoint, completion_body, make_client, run_rates, send_request
from trt_disagg.bench.metrics import RequestRecord, RunResult
from trt_disagg.bench.progress import RunProgress
from trt_disagg.config import SLO, dump_deployment
from trt_disagg.contract import Role
from trt_disagg.demo.handoff import HandoffSample, from_record, with_phases
from trt_disagg.demo.variants import Variant
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.workload import WorkloadRequest

log = logging.getLogger(__name__)

# The demo measures greedy decoding unless told otherwise (`trt-disagg demo --temperature`): the profile it
# predicts from times greedy steps, and the README's figures say which sampling each run used
DEMO_TEMPERATURE = 0.0


Window = tuple[float, float]  # wall-clock (time.time()) start and end of one rate's run
AfterRate = Callable[[RunResult, list[Path], Window], None]  # a rate's run is done; the iteration logs; when


@dataclass(frozen=True)
class Measured:
    runs: list[RunResult]  # in the order they ran
    handoffs: list[HandoffSample]  # probes sent one at a time on the warm deployment (disaggregated)
    handoff_input_lens: list[int]
    iteration_logs: list[Path]  # one JSONL per instance

    @property
    def handoffs_s(self) -> list[float]:
        """Prefill done -> first decode token of each probe."""
        return [h.total_s for h in self.handoffs]


def measure(variant: Variant, requests: Sequence[WorkloadRequest], rates: Sequence[float] | SearchSpec, slo: SLO,
            *, engines_root: Path, run_dir: Path, arrival: str = "poisson", seed: int = 0,
            request_timeout_s: float = 120.0, handoff_samples: int = 5, handoff_warmup: int = 2,
            after_rate: AfterRate | None = None, temperature: float = DEMO_TEMPERATURE) -> Measured:
    """Serve `variant` and run the load generator at `rates` (a list: each in order; a SearchSpec: a
    goodput bisection that stops once the crossing is known to `rel_tol` or after `max_runs` rates)."""
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

        logs = [cluster.iteration_log_path(p.instance_id) for p in cluster.plans()]
        runs: list[RunResult] = []

        async def one_rate(model: str, rate: float) -> float:
            began = time.time()
            with RunProgress() as bar:  # one bar per rate, advanced as each request finishes
                run = (await run_rates(url, model, requests, [rate], slo, arrival=arrival, seed=seed,
                                       request_timeout_s=request_timeout_s, on_run=bar.on_run,
                                       on_record=bar.on_record, temperature=temperature))[0]
            runs.append(run)
            if after_rate is not None:
                after_rate(run, logs, (began, time.time()))
            return run.summary().attainment

        async def bench() -> list[HandoffSample]:
            model = await check_endpoint(url)
            handoffs = []
            if disaggregated:
                probes = [requests[i % len(requests)] for i in range(handoff_warmup + handoff_samples)]
                handoffs = (await observe_handoffs(url, model, probes, request_timeout_s, temperature))[handoff_warmup:]
            if isinstance(rates, SearchSpec):
                await search_rates(lambda rate: one_rate(model, rate), rates)
            else:
                for rate in rates:
                    await one_rate(model, rate)
            return handoffs

        handoffs = with_phases(asyncio.run(bench()), logs)
    return Measured(runs, handoffs, [requests[(handoff_warmup + i) % len(requests)].input_len
                                     for i in range(len(handoffs))], logs)


async def observe_handoffs(url: str, model: str, requests: Sequence[WorkloadRequest], timeout_s: float,
                           temperature: float = DEMO_TEMPERATURE) -> list[HandoffSample]:
    """Send each request alone (4 output tokens) and read its Redis record: PREFILL_DONE -> DECODING.

    The time between the first token (prefill) and the second (the decode instance's first step) is what a
    hand-off costs on this deployment when nothing else runs: what the simulator's `handoff_s` stands for.
    The caller drops the first few: a fresh instance's first steps and first pulls touch memory and build
    kernels for the first time (measured: the first hand-off 1.2 s, its first decode steps 0.9, 0.3 s).
    """
    base = url.rstrip("/")
    handoffs = []
    async with make_client(timeout_s) as client:
        for i, req in enumerate(requests):
            rec = RequestRecord(index=i, input_len=req.input_len, expected_output_len=4, scheduled_s=0.0, sent_s=0.0)
            body = completion_body(model, replace(req, output_len=4), temperature=temperature)
            await send_request(client, base, body, rec, timeout_s)
            if not rec.ok or rec.request_id is None:
                raise RuntimeError(f"hand-off probe request failed: {rec.error or 'no request id in the stream'}")
            try:
                record = (await client.get(f"{base}/v1/requests/{rec.request_id}")).json()
                handoffs.append(from_record(rec.request_id, record["timestamps"]))
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                raise RuntimeError(f"no hand-off timestamps for request {rec.request_id}: {exc}") from None
    return handoffs
