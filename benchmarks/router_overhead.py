"""What the router adds to a streaming request: the same workload straight to a colocated Triton instance
and through the router (in its own process) to that same instance, interleaved request by request.

    direct:  gRPC ModelStreamInfer (context_and_generation, streaming) from this process — the router's own
             Triton client code (router.instance_client), i.e. the cheapest way a Python client talks to Triton
    router:  POST /v1/completions (stream, token-id prompt) → router → the same instance; SSE parsed here

Prints p50/p99 of the added latency per request (TTFT and end-to-end) and per token (inter-token gap), and
writes the raw numbers plus the resolved setup as JSON next to the printout (--out).

The instance runs the fake engine by default (`fake:colocated`: instant tokens, so the router's cost is not
hidden in engine noise); `--engine tiny` serves the real tiny engine instead. The router needs a tokenizer:
the tiny deployment's colocated engine is built (seconds) into a temp dir for it.

    .venv/bin/python benchmarks/router_overhead.py --requests 200 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from router.instance_client import TritonInstanceClient  # noqa: E402
from trt_disagg.config import Deployment, load_deployment  # noqa: E402
from trt_disagg.contract import InstanceInfo, Role, SamplingParams  # noqa: E402

log = logging.getLogger("router_overhead")


@dataclass
class Timing:
    ttft_s: float
    e2e_s: float
    gaps_s: list[float] = field(default_factory=list)
    num_tokens: int = 0


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def direct_once(client: TritonInstanceClient, inst: InstanceInfo, prompt: list[int], n: int) -> Timing:
    t0 = time.perf_counter()
    stamps = []
    sampling = SamplingParams(max_new_tokens=n, temperature=0.0, end_id=-1)
    async for _ in client.generate_stream(inst, f"direct-{t0}", prompt, sampling):
        stamps.append(time.perf_counter())
    return _timing(t0, stamps)


class SSEConnection:
    """A lean HTTP/1.1 keep-alive client for one streaming POST at a time (chunked SSE responses).

    httpx spends tens of microseconds per streamed line in this process; that is the client's cost, not the
    router's, so the router side is read with raw asyncio streams (the direct side is raw gRPC as well).
    """

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: dict) -> tuple[float, list[float]]:
        """Sends the request; returns (t_sent, arrival time of each data event that carries text)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        self._writer.write(head + payload)
        status = await self._reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"router answered {status!r}")
        while (await self._reader.readline()) not in (b"\r\n", b""):
            pass
        stamps: list[float] = []
        while True:
            size = int((await self._reader.readline()).strip(), 16)
            data = await self._reader.readexactly(size + 2)
            now = time.perf_counter()
            if size == 0:
                return t0, stamps
            for event in data.split(b"\n\n"):
                if event.startswith(b"data: {") and b'"text":""' not in event:
                    stamps.append(now)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()


async def router_once(conn: SSEConnection, prompt: list[int], n: int, model: str) -> Timing:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "stream": True, "temperature": 0}
    t0, stamps = await conn.post_stream("/v1/completions", body)
    return _timing(t0, stamps)


def _timing(t0: float, stamps: list[float]) -> Timing:
    if not stamps:
        raise RuntimeError("no token received")
    return Timing(ttft_s=stamps[0] - t0, e2e_s=stamps[-1] - t0,
                  gaps_s=[b - a for a, b in zip(stamps, stamps[1:], strict=False)], num_tokens=len(stamps))


def start_router(settings_env: dict[str, str], port: int, profile: Path | None, loop: str) -> subprocess.Popen:
    env = {**os.environ, **settings_env, "TRT_DISAGG_ROUTER_PORT": str(port), "ROUTER_OVERHEAD_LOOP": loop}
    if profile is not None:
        env["ROUTER_OVERHEAD_PROFILE"] = str(profile)
    return subprocess.Popen([sys.executable, __file__, "--router-child"], env=env, cwd=str(REPO),
                            start_new_session=True)


def router_child() -> None:
    """The router process: settings from TRT_DISAGG_ROUTER_* (set by start_router)."""
    import uvicorn

    from router.app import create_app
    from router.settings import RouterSettings

    settings = RouterSettings()
    profile = os.environ.get("ROUTER_OVERHEAD_PROFILE")
    loop = os.environ.get("ROUTER_OVERHEAD_LOOP", "auto")
    if not profile:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning", loop=loop)
        return
    import cProfile
    import signal

    def _exit(*_: object) -> None:  # uvicorn re-raises SIGTERM after its shutdown: leave through `finally`
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    prof = cProfile.Profile()
    prof.enable()
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning", loop=loop)
    finally:
        prof.disable()
        prof.dump_stats(profile)


async def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("router exited during start-up")
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)  # polling another process's readiness
    raise RuntimeError("router not healthy in time")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace, dep: Deployment, redis_url: str, inst: InstanceInfo, url: str,
              router_pid: int) -> dict:
    prompt = [1] + [(7 * i + 11) % 900 + 10 for i in range(args.prompt_tokens - 1)]
    client = TritonInstanceClient(prefill_timeout_s=60)
    direct: list[Timing] = []
    routed: list[Timing] = []
    floor_s: list[float] = []
    host, port = url.removeprefix("http://").split(":")
    conn = SSEConnection(host, int(port))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for _ in range(args.requests):  # the HTTP stack alone (httpx + uvicorn + FastAPI), no work
                t0 = time.perf_counter()
                (await http.get("/v1/models")).raise_for_status()
                floor_s.append(time.perf_counter() - t0)
            for _ in range(args.warmup):
                await direct_once(client, inst, prompt, args.max_tokens)
                await router_once(conn, prompt, args.max_tokens, dep.name)
            # The router's CPU per request barely moves with the load other processes put on the machine,
            # unlike the latencies: first its idle rate (the refresh loop), then the measured part's.
            idle_cpu_s, idle_t = cpu_s(router_pid), time.monotonic()
            await asyncio.sleep(2.0)
            idle_rate = (cpu_s(router_pid) - idle_cpu_s) / (time.monotonic() - idle_t)
            busy_cpu_s, busy_t = cpu_s(router_pid), time.monotonic()
            for i in range(args.requests):  # interleaved, alternating which goes first
                pair = [lambda: direct_once(client, inst, prompt, args.max_tokens),
                        lambda: router_once(conn, prompt, args.max_tokens, dep.name)]
                order = (0, 1) if i % 2 == 0 else (1, 0)
                for k in order:
                    t = await pair[k]()
                    (direct if k == 0 else routed).append(t)
            busy_cpu_s = cpu_s(router_pid) - busy_cpu_s - idle_rate * (time.monotonic() - busy_t)
            metrics = (await http.get("/metrics")).text
    finally:
        await conn.close()
        await client.close()
    out = summarise(direct, routed)
    out["router_internal_ttft_mean_ms"] = _histogram_mean_ms(metrics, "trtd_router_ttft_seconds", 'path="colocated"')
    out["http_floor"] = {"p50_ms": percentile(floor_s, 50) * 1e3, "p99_ms": percentile(floor_s, 99) * 1e3}
    out["router_cpu_per_request_ms"] = busy_cpu_s / args.requests * 1e3
    return out


def _histogram_mean_ms(text: str, name: str, label: str) -> float | None:
    """Mean of a Prometheus histogram (sum / count) from the exposition text, in ms."""
    values = {}
    for line in text.splitlines():
        for part in ("_sum", "_count"):
            if line.startswith(f"{name}{part}{{") and label in line:
                values[part] = float(line.rsplit(" ", 1)[1])
    if not values.get("_count"):
        return None
    return values["_sum"] / values["_count"] * 1e3


def summarise(direct: list[Timing], routed: list[Timing]) -> dict:
    def stats(xs: list[float]) -> dict[str, float]:
        return {"p50_ms": percentile(xs, 50) * 1e3, "p99_ms": percentile(xs, 99) * 1e3,
                "mean_ms": statistics.fmean(xs) * 1e3}

    out: dict = {}
    for name, get in (("ttft", lambda t: [t.ttft_s]), ("e2e", lambda t: [t.e2e_s]), ("itl", lambda t: t.gaps_s)):
        d = [x for t in direct for x in get(t)]
        r = [x for t in routed for x in get(t)]
        sd, sr = stats(d), stats(r)
        out[name] = {"direct": sd, "router": sr,
                     "added": {k: sr[k] - sd[k] for k in sd}}
    out["tokens_per_request"] = {"direct": statistics.fmean(t.num_tokens for t in direct),
                                 "router": statistics.fmean(t.num_tokens for t in routed)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--engine", choices=["fake", "tiny"], default="fake")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="fake engine: emulated time per generation step (0: instant tokens). At a real "
                         "engine's pace (a GPU decode step is ~10-50 ms) the router's per-token work overlaps "
                         "the next step instead of queueing behind instant tokens")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    ap.add_argument("--profile-router", type=Path, default=None, help="write a cProfile of the router process")
    ap.add_argument("--router-loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                    help="the router's event loop (uvicorn's choice; auto: uvloop when installed)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from trt_disagg.engine_build.builder import build_deployment
    from trt_disagg.registry_read import get_instance
    from trt_disagg.triton.cluster import LocalCluster
    from trt_disagg.triton.launch import free_port

    base = load_deployment(REPO / "configs" / "tiny.yaml")
    dep = base.model_copy(update={"context_servers": None, "generation_servers": None})
    with tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp:
        build_deployment(dep, engines_root=Path(tmp), roles=["colocated"])
        fake = "fake:colocated" + (f":1:1:{args.step_ms:g}" if args.step_ms > 0 else "")
        overrides = {Role.COLOCATED: fake} if args.engine == "fake" else {}
        cluster = LocalCluster(dep, engines_root=Path(tmp), start_router=False, engine_overrides=overrides,
                               ready_timeout_s=180)
        cluster.start()
        router = None
        try:
            import redis.asyncio as aioredis

            async def find() -> InstanceInfo:
                ar = aioredis.from_url(str(cluster.redis_url))
                try:
                    info = await get_instance(ar, "colocated-0")
                    assert info is not None, "colocated-0 did not register"
                    return info
                finally:
                    await ar.aclose()

            inst = asyncio.run(find())
            port = free_port()
            env = {"TRT_DISAGG_ROUTER_REDIS_URL": str(cluster.redis_url),
                   "TRT_DISAGG_ROUTER_SERVED_MODEL_NAME": dep.name,
                   "TRT_DISAGG_ROUTER_ENGINE_DIR": str(dep.engine_dir(Role.COLOCATED, Path(tmp))),
                   "TRT_DISAGG_ROUTER_ROUTER_ID": "overhead-bench",
                   "TRT_DISAGG_ROUTER_END_ID": "-1",  # as the direct client: no early stop on either side
                   "TRT_DISAGG_ROUTER_MAX_INPUT_LEN": "256", "TRT_DISAGG_ROUTER_MAX_SEQ_LEN": "512"}
            router = start_router(env, port, args.profile_router, args.router_loop)
            url = f"http://127.0.0.1:{port}"
            asyncio.run(wait_healthy(url, router))
            result = asyncio.run(run(args, dep, str(cluster.redis_url), inst, url, router.pid))
        finally:
            try:
                if router is not None:
                    router.terminate()
                    try:
                        router.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        router.kill()
                        router.wait()
            finally:
                cluster.stop()
    result["setup"] = {**vars(args), "out": str(args.out) if args.out else None,
                       "profile_router": str(args.profile_router) if args.profile_router else None,
                       "instance": asdict(inst) | {"role": inst.role.value}, "cpu_count": os.cpu_count()}
    engine = args.engine + (f" ({args.step_ms:g} ms per step)" if args.engine == "fake" and args.step_ms else "")
    print(f"router overhead, engine={engine}, {args.requests} requests x {args.max_tokens} tokens, "
          f"prompt {args.prompt_tokens} tokens, concurrency 1, interleaved")
    print(f"{'':8}{'direct p50':>12}{'router p50':>12}{'added p50':>12}{'direct p99':>12}{'router p99':>12}"
          f"{'added p99':>12}   (ms)")
    for name in ("ttft", "e2e", "itl"):
        d, r, a = result[name]["direct"], result[name]["router"], result[name]["added"]
        print(f"{name:8}{d['p50_ms']:12.3f}{r['p50_ms']:12.3f}{a['p50_ms']:12.3f}{d['p99_ms']:12.3f}"
              f"{r['p99_ms']:12.3f}{a['p99_ms']:12.3f}")
    floor = result["http_floor"]
    print(f"http floor (GET /v1/models through the same client, no router work): p50 {floor['p50_ms']:.3f} ms, "
          f"p99 {floor['p99_ms']:.3f} ms")
    internal = result["router_internal_ttft_mean_ms"]
    if internal is not None:
        print(f"router's own view (request parsed -> first token from the instance), mean incl. warm-up: "
              f"{internal:.3f} ms; direct TTFT mean {result['ttft']['direct']['mean_ms']:.3f} ms")
    print(f"router CPU per request (user+sys, all threads, idle rate subtracted): "
          f"{result['router_cpu_per_request_ms']:.3f} ms")
    per_token = result["e2e"]["added"]["mean_ms"] / max(1.0, result["tokens_per_request"]["router"])
    ttft_added, e2e_added = result["ttft"]["added"]["p50_ms"], result["e2e"]["added"]["p50_ms"]
    print(f"added per request, p50: {ttft_added:.3f} ms to the first token, {e2e_added:.3f} ms to the last; "
          f"per token: {result['itl']['added']['p50_ms']:.4f} ms (inter-token p50), {per_token:.4f} ms (mean "
          f"e2e added / tokens)")
    print(f"target p50 added <= 2 ms: first token {'met' if ttft_added <= 2.0 else 'NOT met'}, "
          f"last token {'met' if e2e_added <= 2.0 else 'NOT met'}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    if sys.argv[1:] == ["--router-child"]:
        router_child()
    else:
        main()
