"""Admission with two routers on one pool: the same 4x burst through one router, then spread over two.

A router sees the first tokens of its own requests only, while the pool's queue it admits against is every
router's. Forecast from its own completions alone, a router with half the traffic would see the pool's
queue drain at half the pool's pace, forecast twice the wait and refuse what the pool could have served in
time. Each router therefore publishes how many prompt tokens it saw prefilled (router/dispatch.py) and
replays its share of the queue (router/admission.py). Both bursts are measured in one run on the tiny
deployment (`admission: ttft`, 2 s target), side by side:

    one router    admitted, 429, admitted TTFT p50/p90 against the target
    two routers   the same, the arrivals alternating between them (as a load balancer would), after both
                  served the pool for a few seconds (steady operation, not a router that just started)
    retrying      the same burst over two routers from clients that retry a 429 as openai-python does (after
                  its retry-after-ms, at most twice; each attempt to the next router): the refused clients of
                  both routers wait in one queue outside, and each router places its own behind the others'
                  (router/admission.py): clients served, admitted TTFT, Retry-After against the drain of the
                  work ahead, the pool's pace against its capacity

    .venv/bin/python benchmarks/admission_routers.py     # ~6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.chaos_client import args_with, burst, capacity_rps, until  # noqa: E402
from benchmarks.chaos_deployment import idle, tiny_cluster  # noqa: E402
from benchmarks.chaos_retries import retry_report, retrying_burst  # noqa: E402
from trt_disagg.triton.cluster import LocalCluster  # noqa: E402
from trt_disagg.triton.launch import free_port, stop_process  # noqa: E402

WARM_S = 3.0  # load through both routers just before their burst


async def healthy(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1.0) as http:
            return (await http.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False


def second_router(cluster: LocalCluster, config: Path, root: Path, port: int) -> subprocess.Popen:
    """Another router process on the same deployment and Redis, as a second host would run it."""
    log = open(root / "router-2.log", "ab")  # noqa: SIM115 - owned by the process below
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "router", str(config), "--redis-url", str(cluster.redis_url),
             "--port", str(port), "--engines-dir", str(root)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def row(name: str, summary: dict) -> str:
    return (f"{name:12s} {summary['rate_rps']:7.1f} {summary['sent']:6d} {summary['admitted']:9d} "
            f"{summary['refused_429']:6d} {summary['admitted_ttft_p50_s']:9.2f} {summary['admitted_ttft_p90_s']:9.2f} "
            f"{100 * summary['admitted_within_target']:8.0f}%")


async def run_in(root: Path, args: argparse.Namespace) -> dict:
    cluster, config = tiny_cluster(root, args.ttft_slo_s)
    print("starting the deployment and a second router ...", flush=True)
    cluster.start()
    other: subprocess.Popen | None = None
    try:
        port = free_port()
        other = second_router(cluster, config, root, port)
        urls = [str(cluster.router_url), f"http://127.0.0.1:{port}"]
        await until(lambda: healthy(urls[1]), 60, "the second router healthy")
        capacity = await capacity_rps(urls[0], args)
        print(f"capacity {capacity:.1f} req/s; 4x burst through one router ...", flush=True)
        one = await burst(urls[0], 4 * capacity, args, capacity)
        await until(lambda: idle(cluster), 60, "instances idle after the burst")
        # both routers serve the pool first, as in steady operation: each has prefills of its own in its window
        await asyncio.gather(*(capacity_rps(url, args_with(args, capacity_s=WARM_S)) for url in urls))
        print("the same burst spread over two routers ...", flush=True)
        two = await burst(urls, 4 * capacity, args, capacity)
        await until(lambda: idle(cluster), 60, "instances idle after the burst")
        print("clients retrying, over two routers ...", flush=True)
        retrying = await retrying_burst(urls, 4 * capacity, args, capacity)
        await until(lambda: idle(cluster), 60, "instances idle after the burst")
    finally:
        if other is not None:
            stop_process(other, timeout_s=10)
        cluster.stop()
    print(f"{'':12s} {'req/s':>7s} {'sent':>6s} {'admitted':>9s} {'429':>6s} {'TTFT p50':>9s} {'TTFT p90':>9s} "
          f"{'met':>9s}   (target {args.ttft_slo_s:g} s)")
    print(row("one router", one))
    print(row("two routers", two))
    print(f"admitted two routers / one: {two['admitted'] / max(1, one['admitted']):.2f}")
    print("\n".join(retry_report(retrying)))
    keep = ("rate_rps", "sent", "admitted", "refused_429", "admitted_ttft_p50_s", "admitted_ttft_p90_s",
            "admitted_within_target")
    return {"capacity_rps": capacity, "one_router": {k: one[k] for k in keep},
            "two_routers": {k: two[k] for k in keep}, "retrying_two_routers": retrying, "args": vars(args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ttft-slo-s", type=float, default=2.0, help="the TTFT SLO the routers admit against")
    ap.add_argument("--capacity-s", type=float, default=6.0)
    ap.add_argument("--burst-s", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--request-timeout-s", type=float, default=90.0)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "admission_routers")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="trtd-routers-"))
    try:
        result = asyncio.run(run_in(root, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "admission_routers.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out / 'admission_routers.json'}")


if __name__ == "__main__":
    main()
