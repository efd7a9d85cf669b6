"""Chaos: the tiny deployment (prefill TP2, two decode PP2, colocated; router and embedded Valkey as their own
processes, supervised as `trt-disagg serve` supervises them) under steady greedy load while one fault after
another hits it; then an overload burst. Prints, per fault, what the clients saw and how long recovery took:

    sent / ok / clear error / hung / lost / token mismatches / recovery seconds        + leaks at the end

    ok            a complete answer equal, token for token, to the fault-free answer of that prompt
    clear error   an HTTP error status (429/502/503/504...), an SSE error event, or a refused connection
    hung          no end within --request-timeout-s
    lost          the stream ended without [DONE] and without an error (a silent cut)
    mismatch      a complete answer that differs from the fault-free one (a token lost or repeated)
    recovery      from the fault until the deployment is whole again (the process back and registered,
                  or a new request served)

Faults, in order: SIGKILL a decode instance; SIGKILL one TP rank of the prefill instance; SIGSTOP the other
decode instance for --stop-s (then SIGCONT); Redis shut down (restarted empty by the supervisor); the router
sent SIGTERM (it drains, the supervisor restarts it). Then a burst at 4x the measured throughput with the
router admitting against the TTFT SLO: admitted requests' TTFT p90 vs the target, and each 429's Retry-After
vs the actual drain time (from the client having the 429 until the router admitted a request sent after that).
Then the same burst from clients that act on the 429 as openai-python does (back after `retry-after-ms`, at
most twice): admitted TTFT against the target, clients served, requests sent per client.

    .venv/bin/python benchmarks/chaos.py                    # ~7 minutes on 2 cores
    .venv/bin/python benchmarks/chaos.py --only overload    # the two overload bursts alone, ~3 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.chaos_client import (  # noqa: E402
    OUTCOMES,
    PROMPTS,
    FaultResult,
    Load,
    burst,
    capacity_rps,
    one_request,
    oversized,
    pid_of,
    registered,
    until,
)
from benchmarks.chaos_deployment import idle, tiny_cluster  # noqa: E402
from benchmarks.chaos_retries import (  # noqa: E402
    retry_queue_empty,
    retry_queue_s,
    retry_report,
    retrying_burst,
    return_share,
)
from tests.faults.helpers import group_pids, rank_pids, shm_left, temp_entries  # noqa: E402
from trt_disagg.contract import Role  # noqa: E402
from trt_disagg.triton.cluster import LocalCluster  # noqa: E402
from trt_disagg.triton.supervise import Supervisor  # noqa: E402

# ---- the deployment -------------------------------------------------------------------------------------


class Supervising:
    """The supervisor `serve` runs, ticking in a thread for the length of the run."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.supervisor = Supervisor(cluster)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def __enter__(self) -> Supervising:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.supervisor.tick()


# ---- the faults: each returns its recovery seconds --------------------------------------------------------


async def served(url: str, args: argparse.Namespace) -> bool:
    async with httpx.AsyncClient(timeout=30) as http:
        out = await one_request(http, url, PROMPTS[0], args, None, "probe")
    return out.kind == "ok"


async def instance_back(cluster: LocalCluster, name: str, role: Role, old_pids: set[int]) -> bool:
    """A new process (not one of `old_pids`) serves `name`: up, its model ready, and registered."""
    server = next(p for p in cluster.processes if p.instance_id == name)
    if server.proc is None or server.proc.pid in old_pids or cluster.why_down(name) is not None:
        return False
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            if (await http.get(f"http://{server.http_url}/v2/health/ready")).status_code != 200:
                return False
    except httpx.HTTPError:
        return False
    return name in await registered(str(cluster.redis_url), role)


async def kill_instance(cluster: LocalCluster, args: argparse.Namespace) -> float:
    old = pid_of(cluster, "decode-0")
    os.killpg(old, signal.SIGKILL)  # the server, its stub and its rank processes
    return await until(lambda: instance_back(cluster, "decode-0", Role.DECODE, {old}), 300, "decode-0 back")


async def kill_rank(cluster: LocalCluster, args: argparse.Namespace) -> float:
    """One TP rank dies: the instance deregisters and exits, the supervisor starts it again."""
    server = pid_of(cluster, "prefill-0")
    ranks = rank_pids(server)
    if not ranks:
        raise RuntimeError("prefill-0 has no rank processes to kill")
    os.kill(ranks[-1], signal.SIGKILL)
    return await until(lambda: instance_back(cluster, "prefill-0", Role.PREFILL, {server}), 300,
                       "prefill-0 whole again")


async def stop_instance(cluster: LocalCluster, args: argparse.Namespace) -> float:
    pid = pid_of(cluster, "decode-1")
    os.killpg(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(args.stop_s)  # the fault lasts this long; the load goes on meanwhile
    finally:
        os.killpg(pid, signal.SIGCONT)
    return await until(lambda: instance_back(cluster, "decode-1", Role.DECODE, set()), 120, "decode-1 rejoined")


async def restart_redis(cluster: LocalCluster, args: argparse.Namespace) -> float:
    client = aioredis.from_url(str(cluster.redis_url))
    try:
        await client.shutdown(nosave=True)
    except (aioredis.ConnectionError, OSError):
        pass  # the connection closes as the server exits
    finally:
        await client.aclose()
    return await until(lambda: served(str(cluster.router_url), args), 120, "served after the Redis restart")


async def restart_router(cluster: LocalCluster, args: argparse.Namespace) -> float:
    assert cluster.router_proc is not None
    cluster.router_proc.send_signal(signal.SIGTERM)  # drains, exits; the supervisor starts a new one
    return await until(lambda: served(str(cluster.router_url), args), 120, "served by the restarted router")


FAULTS = [("instance kill", kill_instance), ("rank kill", kill_rank), ("SIGSTOP", stop_instance),
          ("Redis restart", restart_redis), ("router restart", restart_router)]


# ---- the run ----------------------------------------------------------------------------------------------


async def references(url: str, args: argparse.Namespace) -> dict[str, str]:
    """The fault-free answer of every prompt (greedy: what every later answer must equal)."""
    out: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=60) as http:
        for prompt in PROMPTS:
            resp = await http.post(f"{url}/v1/completions", json={
                "model": "chaos", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0})
            resp.raise_for_status()
            out[prompt] = resp.json()["choices"][0]["text"]
    return out


async def faults_under_load(cluster: LocalCluster, args: argparse.Namespace) -> tuple[list[FaultResult], Load]:
    url = str(cluster.router_url)
    load = Load(url, await references(url, args), args)
    running = asyncio.create_task(load.run(args.clients))
    results = []
    try:
        await asyncio.sleep(args.settle_s)  # a steady phase before the first fault: the baseline row
        for name, inject in FAULTS:
            print(f"fault: {name} ...", flush=True)
            load.phase = name
            recovery_s = await inject(cluster, args)
            print(f"  recovered in {recovery_s:.1f}s", flush=True)
            await asyncio.sleep(args.settle_s)  # load goes on after the recovery, still counted to this fault
            results.append(FaultResult(name, recovery_s))
            load.phase = f"after {name}"
    finally:
        load.stop()
        await running
    return results, load


def relabel(load: Load) -> None:
    """Outcomes begun in the settle time after a fault count to that fault."""
    names = [name for name, _ in FAULTS]
    for o in load.outcomes:
        if o.phase.startswith("after "):
            o.phase = o.phase[len("after "):]
    assert all(o.phase in names or o.phase == "steady" for o in load.outcomes)


def leaks(cluster: LocalCluster, temp_before: set[str]) -> dict:
    """What is left after the cluster stopped: processes of its groups, its shm segments, what its processes
    could leave in the system temporary directory that was not there before it started."""
    groups = [p.proc.pid for p in cluster.processes if p.proc is not None]
    prefixes = tuple(x for p in cluster.processes for x in (p.shm_prefix, p.kv_shm_prefix))
    cluster.stop()
    left = [pid for g in groups for pid in group_pids(g)]
    return {"processes": left, "shm": shm_left(prefixes) if prefixes else [],
            "temp": sorted(temp_entries() - temp_before)}


def report(steady: Counter, faults: list[FaultResult], overload: dict, leaked: dict) -> str:
    head = f"{'phase':<16}{'sent':>6}" + "".join(f"{k:>13}" for k in OUTCOMES) + f"{'recovery s':>12}"
    rows = [head, f"{'steady':<16}{sum(steady.values()):>6}" + "".join(f"{steady.get(k, 0):>13}" for k in OUTCOMES)]
    for r in faults:
        rows.append(f"{r.name:<16}{sum(r.counts.values()):>6}" + "".join(f"{r.counts[k]:>13}" for k in OUTCOMES)
                    + f"{r.recovery_s:>12.1f}")
    rows.append("")
    rows.extend(overload_report(overload))
    rows.append(f"leaks: {len(leaked['processes'])} processes, {len(leaked['shm'])} shm segments, "
                f"{len(leaked['temp'])} temporary files or directories left {leaked['temp'] or ''}".rstrip())
    return "\n".join(rows)


def overload_report(overload: dict) -> list[str]:
    rows = [f"overload burst at {overload['rate_rps']:.1f} req/s (4x capacity): sent {overload['sent']}, "
            f"admitted {overload['admitted']}, 429 {overload['refused_429']}"]
    if overload["admitted_ttft_p90_s"] is not None:
        rows.append(f"  admitted TTFT p90 {overload['admitted_ttft_p90_s']:.2f}s (p50 "
                    f"{overload['admitted_ttft_p50_s']:.2f}s) vs target {overload['ttft_target_s']}s: met by "
                    f"{100 * overload['admitted_within_target']:.0f}% of the admitted")
    if overload["retry_after_over_drain_p50"] is not None:
        rows.append("  actual drain time of a 429: from the client having it until the router admitted a request "
                    f"sent after that (p50 {1000 * overload['drain_p50_s']:.0f} ms)")
        rows.append(f"  retry-after-ms / actual drain: p50 {overload['retry_after_over_drain_p50']:.2f} "
                    f"(p10 {overload['retry_after_over_drain_p10']:.2f}, p90 "
                    f"{overload['retry_after_over_drain_p90']:.2f}; announced p50 "
                    f"{1000 * overload['announced_p50_s']:.0f} ms), within 2x for "
                    f"{100 * overload['retry_after_within_2x']:.0f}% of the 429s, within 2x (or 0.1 s) for "
                    f"{100 * overload['retry_after_within_2x_or_tolerance']:.0f}% (from the 429's request: p50 "
                    f"{overload['retry_after_over_drain_from_send_p50']:.2f}, within 2x "
                    f"{100 * overload['retry_after_within_2x_from_send']:.0f}%)")
        if overload.get("retry_after_within_2x_of_backlog") is not None:
            rows.append("  backlog drain of a 429: until the work admitted before it has drained to the target "
                        f"(p10/p50/p90 {overload['backlog_drain_p10_s']:.2f}/{overload['backlog_drain_p50_s']:.2f}/"
                        f"{overload['backlog_drain_p90_s']:.2f}s); retry-after-ms - backlog drain p10/p50/p90 "
                        f"{overload['retry_after_minus_backlog_p10_s']:+.2f}/"
                        f"{overload['retry_after_minus_backlog_p50_s']:+.2f}/"
                        f"{overload['retry_after_minus_backlog_p90_s']:+.2f}s; within 2x (or 0.1 s) for "
                        f"{100 * overload['retry_after_within_2x_of_backlog']:.0f}% of the 429s")
        rows.append(f"  Retry-After (whole seconds) / actual drain: p50 "
                    f"{overload['retry_after_whole_s_over_drain_p50']:.1f}; the first request sent after a 429's "
                    f"retry-after-ms was admitted for {100 * overload['back_at_retry_after_admitted']:.0f}%")
    if overload.get("retry_queue_after_idle_s") is not None:
        rows.append(f"  the 429s' places (their clients never came back) outlasted the burst's work by "
                    f"{overload['retry_queue_after_idle_s']:.1f}s; the retrying burst started once they had passed; "
                    f"the router's share of refused clients seen coming back: "
                    f"{overload.get('return_share_after_plain', 0):.2f}")
    if "retrying" in overload:
        rows.extend(retry_report(overload["retrying"]))
        if overload.get("return_share_after_retrying") is not None:
            rows.append(f"  the router's share of refused clients seen coming back after it: "
                        f"{overload['return_share_after_retrying']:.2f}")
    return rows


async def run(args: argparse.Namespace) -> dict:
    """The whole scenario in a scratch directory (engines, configs, instance logs: ~0.4 GB), removed after."""
    root = Path(tempfile.mkdtemp(prefix="trtd-chaos-"))
    try:
        return await run_in(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def run_in(root: Path, args: argparse.Namespace) -> dict:
    cluster, _ = tiny_cluster(root, args.ttft_slo_s)
    temp_before = temp_entries()  # (the scratch directory `root` among them)
    print("starting the deployment ...", flush=True)
    cluster.start()
    steady: Counter = Counter()
    faults: list[FaultResult] = []
    big: dict | None = None
    try:
        with Supervising(cluster) as sup:
            if args.only != "overload":
                faults, load = await faults_under_load(cluster, args)
                relabel(load)
                steady = Counter(o.kind for o in load.outcomes if o.phase == "steady")
                for r in faults:
                    kinds = Counter(o.kind for o in load.outcomes if o.phase == r.name)
                    r.counts = {k: kinds.get(k, 0) for k in OUTCOMES}
                print("oversized input ...", flush=True)
                big = await oversized(cluster)
            print("overload ...", flush=True)
            capacity = await capacity_rps(str(cluster.router_url), args)
            overload = await burst(str(cluster.router_url), 4 * capacity, args, capacity)
            await until(lambda: idle(cluster), 60, "instances idle after the burst")
            # the plain burst's refused clients never come back, yet hold the places their Retry-After gave them:
            # the retrying burst starts once those have passed, so that it meets only its own clients
            overload["retry_queue_after_idle_s"] = await retry_queue_s(str(cluster.router_url))
            overload["return_share_after_plain"] = await return_share(str(cluster.router_url))
            overload["retry_queue_lapsed_after_s"] = await until(
                lambda: retry_queue_empty(str(cluster.router_url)), 150, "the router's retry queue lapsed")
            print("overload, clients retrying ...", flush=True)
            overload["retrying"] = await retrying_burst(str(cluster.router_url), 4 * capacity, args, capacity)
            overload["return_share_after_retrying"] = await return_share(str(cluster.router_url))
            await until(lambda: idle(cluster), 60, "instances idle after the run")
            restarts = [asdict(r) for r in sup.supervisor.restarts]
    finally:
        leaked = leaks(cluster, temp_before)
    print(report(steady, faults, overload, leaked))
    if big is not None:
        print(f"oversized: 100 MB declared -> {big['upload_100mb']!r}; chunked past the limit -> "
              f"{big['upload_chunked']!r}, slowest of {big['health_polls']} /health answers meanwhile "
              f"{big['health_max_ms']:.0f} ms; 10 MB prompt -> {big['prompt_10mb']}, router RSS "
              f"{big['rss_before_mb']:.0f} -> {big['rss_after_mb']:.0f} MB")
    return {"steady": dict(steady), "faults": [asdict(f) for f in faults], "overload": overload, "oversized": big,
            "restarts": restarts, "leaks": leaked, "capacity_rps": capacity, "args": vars(args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--settle-s", type=float, default=8.0, help="load after each recovery, counted to the fault")
    ap.add_argument("--stop-s", type=float, default=20.0, help="how long the SIGSTOPped instance stays stopped")
    ap.add_argument("--request-timeout-s", type=float, default=90.0, help="a request still open after this hung")
    ap.add_argument("--ttft-slo-s", type=float, default=2.0, help="the TTFT SLO the router admits against")
    ap.add_argument("--capacity-s", type=float, default=6.0)
    ap.add_argument("--burst-s", type=float, default=10.0)
    ap.add_argument("--only", choices=["overload"], default=None,
                    help="run only this phase (overload: capacity, then the burst; ~3 minutes)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "chaos")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out / 'chaos.json'}")
    bad = sum(f["counts"]["hung"] + f["counts"]["lost"] + f["counts"]["mismatch"] for f in result["faults"])
    leaked = result["leaks"]
    sys.exit(1 if bad or leaked["processes"] or leaked["shm"] or leaked["temp"] else 0)


if __name__ == "__main__":
    main()
