"""KV across a shaped network link: the TCP transport's throughput and the hand-off time vs the simulator.

    host h1 (KV server)  ── eth0: netem delay 2 ms + tbf 1 Gbit/s, both directions ──  bridge  ── host h2 (puller)

Two test hosts (network namespaces, `trt_disagg/testing/netns.py`, root only). On h1 a process runs the real
SmolLM2 prefill engine of `configs/smollm2.yaml` (TP2) over a 512-token prompt, keeps the KV that
`export_kv` hands out (the engine's own layout and bytes) and serves it with the prefill instance's KV server
(`SocketKVSender`), offering one signed handle per pull. This process pulls each handle from h2 with the
decode side's `TcpKVReceiver`, so every byte crosses the shaped link; a pull is timed from `fetch()` called
to the KV held here and the source told to free it, which is what the simulator's KV hand-off stands for.

Reported: median pull throughput as a share of the shaped rate (target >= 0.8), and the median pull time
next to the simulator's prediction for the same link (`simulate()` of one request whose prefill and decode
cost nothing, so its first-token-to-finish time is the hand-off alone; target within 20%).
`kv_transfer_bench.py --multihost` runs this; `serve_kv` is the h1 process (`python kv_multihost.py serve`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trt_disagg.kv.wire import PULL_ROUND_TRIPS  # noqa: E402

RATE_MBIT, DELAY_MS, NUM_TOKENS = 1000.0, 2.0, 512
HANDLE_TTL_S = 600.0  # the handles outlive the whole run: expiry is not what this measures


@dataclass(frozen=True)
class MultihostResult:
    rate_mbit: float
    delay_ms: float
    num_tokens: int
    kv_bytes: int
    num_pulls: int
    pull_s_median: float
    pull_s_min: float
    pull_s_max: float
    connect_s_median: float  # one round trip of the shaped link, as TCP's handshake sees it
    link_bytes_per_s: float  # what one bulk TCP stream (plain sockets) gets over the same link: its ceiling
    throughput_bytes_per_s: float
    throughput_ratio: float  # of the shaped rate; target >= 0.8
    predicted_handoff_s: float  # the simulator's KV hand-off for this link (its nominal rate)
    handoff_error: float  # measured / predicted - 1; target |error| <= 0.2
    predicted_handoff_at_link_s: float  # the same with the link's measured bulk rate as kv_link_bytes_per_s


def prefill_engine_dir(engines_dir: Path) -> Path:
    """The SmolLM2 prefill engine (TP2) of configs/smollm2.yaml, built here when missing (seconds)."""
    from trt_disagg.config import load_deployment
    from trt_disagg.engine_build.builder import build_deployment

    build_deployment(load_deployment(REPO / "configs" / "smollm2.yaml"), engines_root=engines_dir, roles=["prefill"])
    return engines_dir / "smollm2" / "prefill"


def serve_kv(engine_dir: Path, bind: str, num_pulls: int, handles_path: Path) -> None:
    """On h1: prefill once with the real engine, then serve that KV to `num_pulls` handles until killed."""
    import torch

    from trt_disagg.contract import RequestType, SamplingParams
    from trt_disagg.engine.llm_engine import LLMEngine
    from trt_disagg.kv.handle import encode_handle, secret_from_env
    from trt_disagg.kv.transport import make_sender

    torch.set_num_threads(1)
    prompt = [(k * 131 + 7) % 40000 + 100 for k in range(NUM_TOKENS)]
    with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=1) as eng:
        eng.add_request("bench", prompt, SamplingParams(max_new_tokens=1), request_type=RequestType.CONTEXT_ONLY)
        while eng.has_unfinished():
            eng.step()
        kv = eng.export_kv("bench")
    secret = secret_from_env()
    if secret is None:
        raise SystemExit("the KV server needs TRT_DISAGG_KV_SECRET (the bench sets it)")
    sender = make_sender("tcp", source=_StaticSource(kv), secret=secret, instance_id="bench-prefill",
                         layout=kv.layout, host=bind, handle_ttl_s=HANDLE_TTL_S)
    sender.start()
    handles = [encode_handle(sender.offer(f"pull{i}", num_tokens=NUM_TOKENS, first_token=0), secret).hex()
               for i in range(num_pulls)]
    kv_bytes = sum(t.numel() * t.element_size() for t in kv.shards.values())
    tmp = handles_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"handles": handles, "kv_bytes": kv_bytes, "layout": kv.layout.to_dict()}))
    tmp.rename(handles_path)  # the bench polls for the file: it appears whole or not at all
    while True:  # serve until the lab kills this host's processes
        time.sleep(3600)


class _StaticSource:
    """Every offered request holds the same (real) KV: release is a no-op, so each pull moves all of it."""

    def __init__(self, kv) -> None:
        self.kv = kv

    def export_kv(self, request_id: str):
        return self.kv

    def release_kv(self, request_id: str) -> None:
        pass


def predicted_handoff_s(kv_bytes_per_token: float, link_bytes_per_s: float, num_tokens: int,
                        rtt_s: float = 2 * DELAY_MS / 1000) -> float:
    """The simulator's hand-off for one request on this link: prefill and decode cost nothing, so the time
    from its first token to its last (of 2) is the KV arriving, as `simulate()` models it: the pull
    protocol's round trips (`handoff_s` = PULL_ROUND_TRIPS x the link's RTT) plus the bytes at the link rate."""
    import numpy as np

    from trt_disagg.planner.latency_model import Coefficients, InstanceTiming, PhaseCoefficients
    from trt_disagg.sim import DisaggSpec, InstanceSpec, SimWorkload, simulate

    free = Coefficients(0.0, 0.0, 0.0)
    inst = InstanceSpec(InstanceTiming(PhaseCoefficients(free, free, free), 1, 576, link_bytes_per_s), 1 << 20)
    spec = DisaggSpec(inst, inst, 1, 1, round(kv_bytes_per_token), link_bytes_per_s,
                      handoff_s=PULL_ROUND_TRIPS * rtt_s)
    res = simulate(spec, SimWorkload.from_lengths(np.zeros(1), [num_tokens], [2]))
    return float(res.finish_s[0] - res.first_token_s[0])


def wait_for_file(path: Path, timeout_s: float, proc) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        if proc.poll() is not None:
            log = (path.parent / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the KV server on h1 exited with {proc.returncode}:\n{log}")
        time.sleep(0.2)
    raise TimeoutError(f"the KV server on h1 did not offer its KV in {timeout_s:.0f}s")


def pull_all(lab, secret: bytes, blobs: list[str]) -> tuple[list[float], list[float]]:
    """Each handle pulled from h2 across the link: (pull seconds, connect seconds) per pull."""
    import socket

    from trt_disagg.kv.handle import decode_handle
    from trt_disagg.kv.transport import make_receiver
    from trt_disagg.kv.wire import parse_kv_url

    receiver = make_receiver("tcp", secret=secret)
    pulls, connects = [], []
    for blob in blobs:
        handle = decode_handle(bytes.fromhex(blob), secret)

        def one(h=handle) -> tuple[float, float]:
            t0 = time.perf_counter()
            socket.create_connection(parse_kv_url(h.kv_url), timeout=5).close()
            t1 = time.perf_counter()
            kv = receiver.fetch(h)
            t2 = time.perf_counter()
            assert kv.num_tokens == NUM_TOKENS
            return t2 - t1, t1 - t0

        pull_s, connect_s = lab.call("h2", one)
        pulls.append(pull_s)
        connects.append(connect_s)
    return pulls, connects


def bulk_stream_bytes_per_s(lab, num_bytes: int) -> float:
    """Payload rate of one plain TCP stream h1 -> h2 of `num_bytes`: what the link itself gives TCP."""
    import socket
    import threading

    addr, listening = lab.hosts["h1"].address, threading.Event()

    def serve() -> None:
        with socket.create_server((addr, 9999)) as srv:
            listening.set()
            conn, _ = srv.accept()
            with conn:
                conn.recv(1)
                conn.sendall(bytes(num_bytes))

    server = threading.Thread(target=lambda: lab.call("h1", serve, timeout_s=120), daemon=True)
    server.start()
    if not listening.wait(10):
        raise TimeoutError("the bulk-stream server on h1 did not start")

    def pull() -> float:
        buf = bytearray(1 << 20)
        with socket.create_connection((addr, 9999), timeout=30) as conn:
            t0, got = time.perf_counter(), 0
            conn.sendall(b"g")
            while got < num_bytes and (n := conn.recv_into(buf)):
                got += n
            return got / (time.perf_counter() - t0)

    rate = lab.call("h2", pull)
    server.join(10)
    return rate  # type: ignore[no-any-return]


def measure(engines_dir: Path, num_pulls: int, workdir: Path) -> MultihostResult:
    from trt_disagg.kv.handle import SECRET_ENV, new_secret
    from trt_disagg.testing.netns import NetnsLab, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"--multihost needs network namespaces: {reason}")
    engine_dir = prefill_engine_dir(engines_dir)
    secret = new_secret()
    handles_path = workdir / "handles.json"
    with NetnsLab(2) as lab:
        lab.shape("h1", rate_mbit=RATE_MBIT, delay_ms=DELAY_MS)
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--engine-dir", str(engine_dir),
               "--bind", lab.hosts["h1"].address, "--pulls", str(num_pulls + 1), "--handles", str(handles_path)]
        env = {**os.environ, SECRET_ENV: secret.hex(), "PYTHONPATH": str(REPO)}
        proc = lab.spawn("h1", cmd, env=env, log_path=workdir / "server.log")
        offered = wait_for_file(handles_path, 300, proc)
        pulls, connects = pull_all(lab, secret, offered["handles"])
        link_rate = bulk_stream_bytes_per_s(lab, 4 * int(offered["kv_bytes"]))
    pulls, connects = pulls[1:], connects[1:]  # the first pull warms both processes up
    kv_bytes = int(offered["kv_bytes"])
    rate = RATE_MBIT * 1e6 / 8
    median = statistics.median(pulls)
    predicted = predicted_handoff_s(kv_bytes / NUM_TOKENS, rate, NUM_TOKENS)
    return MultihostResult(RATE_MBIT, DELAY_MS, NUM_TOKENS, kv_bytes, len(pulls), median, min(pulls), max(pulls),
                           statistics.median(connects), link_rate, kv_bytes / median, kv_bytes / median / rate,
                           predicted, median / predicted - 1,
                           predicted_handoff_s(kv_bytes / NUM_TOKENS, link_rate, NUM_TOKENS))


def report(res: MultihostResult, out: Path) -> None:
    """The printout, and the same numbers (with the setup) as JSON next to it."""
    print(f"KV over a shaped link (h1 -> h2: {res.rate_mbit:.0f} Mbit/s, {res.delay_ms:.0f} ms each way, tbf + delay)")
    print(f"SmolLM2-135M prefill KV (real engine, TP2 layout, float32): {res.num_tokens} tokens, "
          f"{res.kv_bytes / 2**20:.1f} MiB; TCP transport, median of {res.num_pulls} pulls; "
          f"TCP connect (1 RTT) {res.connect_s_median * 1e3:.1f} ms")
    print(f"{'':<22} {'measured':>10} {'predicted':>10} {'ratio':>7} {'target':>10}")
    print(f"{'throughput MB/s':<22} {res.throughput_bytes_per_s / 1e6:>10.1f} {res.rate_mbit / 8:>10.1f} "
          f"{res.throughput_ratio:>7.2f} {'>= 0.80':>10}")
    print(f"{'hand-off ms':<22} {res.pull_s_median * 1e3:>10.1f} {res.predicted_handoff_s * 1e3:>10.1f} "
          f"{1 + res.handoff_error:>7.2f} {'0.80-1.20':>10}")
    at_link = res.pull_s_median / res.predicted_handoff_at_link_s
    print(f"{'hand-off ms, link-rate':<22} {res.pull_s_median * 1e3:>10.1f} {res.predicted_handoff_at_link_s * 1e3:>10.1f} "
          f"{at_link:>7.2f} {'0.80-1.20':>10}")
    print(f"(pull min {res.pull_s_min * 1e3:.1f} ms, max {res.pull_s_max * 1e3:.1f} ms; predicted = simulate() with "
          f"handoff_s = {PULL_ROUND_TRIPS} round trips of the link's {2 * res.delay_ms:.0f} ms and "
          f"kv_link_bytes_per_s = the shaped rate, or (link-rate) what one bulk TCP stream "
          f"gets over this link: {res.link_bytes_per_s / 1e6:.1f} MB/s = "
          f"{res.link_bytes_per_s / (res.rate_mbit * 1e6 / 8):.2f} of the shaped rate)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": {"link": "tbf + netem on h1's link, both directions", "transport": "tcp",
                                         "model": "SmolLM2-135M-Instruct", "engine": "configs/smollm2.yaml prefill"},
                               "result": asdict(res)}, indent=2))
    print(f"written {out}")


def run(engines_dir: Path, num_pulls: int, out: Path) -> MultihostResult:
    with tempfile.TemporaryDirectory(prefix="kv-multihost-") as tmp:
        res = measure(engines_dir, num_pulls, Path(tmp))
    report(res, out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="the KV server process of kv_transfer_bench.py --multihost")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--engine-dir", type=Path, required=True)
    s.add_argument("--bind", required=True)
    s.add_argument("--pulls", type=int, required=True)
    s.add_argument("--handles", type=Path, required=True)
    args = ap.parse_args()
    serve_kv(args.engine_dir, args.bind, args.pulls, args.handles)


if __name__ == "__main__":
    main()
