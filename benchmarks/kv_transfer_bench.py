"""KV transfer between two instance processes: shm and TCP against an in-process copy; a pull's fixed
cost with and without reused receive memory; hand-off latency.

    .venv/bin/python benchmarks/kv_transfer_bench.py [--reps 10] [--handoff-samples 20]
                     [--engines-dir DIR]   (SmolLM2 engines for the hand-off part; built if missing)
    .venv/bin/python benchmarks/kv_transfer_bench.py --fixed-cost-only [--reps 30]
    sudo .venv/bin/python benchmarks/kv_transfer_bench.py --multihost [--reps 10] [--out FILE.json]

Part 1 moves SmolLM2-135M's KV (30 layers, 3 KV heads x 64, float32, prefill layout TP2) of 512 and 2048
tokens from a sender process (the prefill instance's KV server, `SocketKVSender`) into this process
(`ShmKVReceiver` / `TcpKVReceiver`, what a decode instance runs) and compares the throughput with a plain
in-process copy of the same bytes (`clone()` of every shard: allocation + copy, like the receiver).
Targets: shm >= 0.5x and TCP >= 0.3x the in-process copy.

Then the fixed cost of one hand-off's pull on the demo deployment's shape (configs/smollm2-demo.yaml:
TP1 -> TP1, float32, 512 tokens = 22.5 MiB, shm, the sender's segment prewarmed as an instance does) and
its import into a paged KV cache (RankModel.write_kv), per phase, p50 over interleaved pulls in one run:
"fresh" pulls into new tensors through a new mapping of the segment each time (`reuse_buffers=False`)
from a sender that writes the bytes at pull time (`eager_stage=False`); "reused" into receive buffers
given back after the import, through the mapping kept from the previous pull; "ahead" as reused, from a
sender that stages each offer's bytes into shm right after the offer. Each pull starts 2 ms after its
offer (`--gap-ms`): the router's dispatch in between (the demo's hand-off table: ~1 ms dispatch, ~1 ms
until the decode instance starts the pull).

With --multihost (root), neither part: the KV of a 512-token SmolLM2 prefill crosses a link shaped to
1 Gbit/s with 2 ms delay between two network namespaces (`kv_multihost.py`): throughput as a share of the
shaped rate (target >= 0.8) and the hand-off time vs the simulator's link model (target within 20%).

Part 2 serves SmolLM2 with real tritonserver instances (prefill TP2, decode PP2) and measures, per request,
the hand-off latency as a client sees it: prefill response received -> first decode token received
(KV pull + layout conversion + one decode step), p50/p99.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trt_disagg.contract import KVLayout, pp_layer_ranges  # noqa: E402
from trt_disagg.exported_kv import ExportedKV  # noqa: E402
from trt_disagg.triton.tensors import client_inputs  # noqa: E402

SMOLLM2 = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
TOKENS = (512, 2048)


def smollm2_kv(num_tokens: int, tp: int = 2) -> ExportedKV:
    """KV in a TP2 prefill layout (rank 0 holds 2 KV heads, rank 1 holds 1: a balanced split of 3), or TP1."""
    layout = KVLayout(fingerprint="bench", dtype="float32", tokens_per_block=16, tp=tp, pp=1, **SMOLLM2)
    heads = [2, 1] if tp == 2 else [3]
    layers = len(pp_layer_ranges(SMOLLM2["num_layers"], 1)[0])
    shards = {r: torch.randn(layers, 2, num_tokens, h, SMOLLM2["head_dim"]) for r, h in enumerate(heads)}
    return ExportedKV(layout=layout, num_tokens=num_tokens, shards=shards)


class _StaticSource:
    """A prefill engine stand-in whose every request holds the same KV (export is free, release a no-op)."""

    def __init__(self, kv: ExportedKV) -> None:
        self.kv = kv

    def export_kv(self, request_id: str) -> ExportedKV:
        return self.kv

    def release_kv(self, request_id: str) -> None:
        pass


def sender_process(conn, secret: bytes, num_tokens: int, tp: int = 2, eager_stage: bool = True) -> None:
    """The 'prefill instance': a KV server (its segment prewarmed, as an instance's); answers offer requests
    from the pipe with handles."""
    torch.set_num_threads(1)
    from trt_disagg.kv.handle import encode_handle
    from trt_disagg.kv.transport import make_sender

    kv = smollm2_kv(num_tokens, tp)
    sender = make_sender("tcp", source=_StaticSource(kv), secret=secret, instance_id="bench-prefill",
                         layout=kv.layout, prewarm_tokens=num_tokens, eager_stage=eager_stage)
    sender.start()
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            handle = sender.offer(msg, num_tokens=num_tokens, first_token=0)
            conn.send(encode_handle(handle, secret))
    finally:
        sender.close()


def in_process_copy_s(kv: ExportedKV, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        copies = {r: t.clone() for r, t in kv.shards.items()}
        times.append(time.perf_counter() - t0)
        del copies
    return statistics.median(times)


def transfer_s(mode: str, num_tokens: int, reps: int) -> float:
    from trt_disagg.kv.handle import decode_handle, new_secret
    from trt_disagg.kv.transport import make_receiver

    secret = new_secret()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=sender_process, args=(child, secret, num_tokens), daemon=True)
    proc.start()
    try:
        receiver = make_receiver(mode, secret=secret)
        times = []
        for i in range(reps + 1):  # the first pull warms up both processes
            parent.send(f"r{i}")
            handle = decode_handle(parent.recv(), secret)
            t0 = time.perf_counter()
            kv = receiver.fetch(handle)
            dt = time.perf_counter() - t0
            assert kv.num_tokens == num_tokens
            if i:
                times.append(dt)
        return statistics.median(times)
    finally:
        parent.send(None)
        proc.join(30)


def part1(reps: int) -> None:
    torch.set_num_threads(1)
    print("KV transfer between two processes (SmolLM2-135M KV, float32, TP2 prefill layout)")
    print(f"{'tokens':>7} {'MiB':>7} {'copy GiB/s':>11} {'shm GiB/s':>10} {'shm/copy':>9} "
          f"{'tcp GiB/s':>10} {'tcp/copy':>9}")
    for n in TOKENS:
        kv = smollm2_kv(n)
        nbytes = sum(t.numel() * t.element_size() for t in kv.shards.values())
        copy_s = in_process_copy_s(kv, reps)
        shm_s = transfer_s("shm", n, reps)
        tcp_s = transfer_s("tcp", n, reps)
        gib = nbytes / 2**30
        print(f"{n:>7} {nbytes / 2**20:>7.1f} {gib / copy_s:>11.2f} {gib / shm_s:>10.2f} {copy_s / shm_s:>9.2f} "
              f"{gib / tcp_s:>10.2f} {copy_s / tcp_s:>9.2f}")
    print("targets: shm/copy >= 0.5, tcp/copy >= 0.3 (medians of", reps, "pulls)")


FIXED_COST_PHASES = ("connect_s", "meta_s", "data_s", "source_stage_s", "release_s", "import_s", "total_s")


def _bare_kv_cache(num_tokens: int) -> tuple[SimpleNamespace, list[int]]:
    """The demo decode instance's KV cache (32768 slots) as RankModel.write_kv sees it (no weights needed),
    and the slots of a `num_tokens` prompt in blocks a previous request freed (the pool hands them back
    last-freed first, so each 16-token block lies apart from the next)."""
    from trt_disagg.engine.block_pool import BlockPool, slot_indices

    shape = (SMOLLM2["num_layers"], 32768, SMOLLM2["num_kv_heads"], SMOLLM2["head_dim"])
    cache = SimpleNamespace(k_cache=torch.zeros(shape), v_cache=torch.zeros(shape), device=torch.device("cpu"))
    pool = BlockPool(32768 // 16, 16)
    blocks = pool.try_allocate(-(-num_tokens // 16))
    assert blocks is not None
    pool.free(blocks)
    blocks = pool.try_allocate(len(blocks))
    assert blocks is not None
    return cache, slot_indices(blocks, num_tokens, 16)


def _paged_import(kv: ExportedKV, cache: SimpleNamespace, slots: list[int]) -> None:
    """The decode engine's import of a TP1 KV of its own layout: RankModel.write_kv itself."""
    from trt_disagg.engine.model import RankModel

    (shard,) = kv.shards.values()
    RankModel.write_kv(cache, slots, shard)  # type: ignore[arg-type]


# label -> (the sender stages offers ahead, the receiver reuses its buffers and mappings)
FIXED_COST_VARIANTS = {"fresh": (False, False), "reused": (False, True), "ahead": (True, True)}


def fixed_cost(reps: int, num_tokens: int = 512, gap_ms: float = 2.0) -> None:
    """Per-phase p50 of pull + import for each of FIXED_COST_VARIANTS, pulls interleaved in one run."""
    from trt_disagg.kv.handle import decode_handle, new_secret
    from trt_disagg.kv.transport import make_receiver

    torch.set_num_threads(1)
    secret = new_secret()
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for eager in (False, True):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=sender_process, args=(child, secret, num_tokens, 1, eager), daemon=True)
        proc.start()
        pipes[eager], procs = parent, procs + [proc]
    cache, slots = _bare_kv_cache(num_tokens)
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in FIXED_COST_VARIANTS}
    try:
        for i in range(reps + 2):  # the first two rounds warm up every process (and show the senders shm)
            for label, (eager, reuse) in FIXED_COST_VARIANTS.items():
                pipes[eager].send(f"{label}{i}")
                handle = decode_handle(pipes[eager].recv(), secret)
                time.sleep(gap_ms / 1e3)  # the router's dispatch between the prefill response and the pull
                receiver = make_receiver("shm", secret=secret, reuse_buffers=reuse)
                t0 = time.perf_counter()
                kv = receiver.fetch(handle)
                t1 = time.perf_counter()
                _paged_import(kv, cache, slots)
                kv.consumed()
                t2 = time.perf_counter()
                timing = receiver.last_timing
                assert timing is not None
                if i >= 2:
                    rows[label].append({**{k: getattr(timing, k) for k in FIXED_COST_PHASES[:5]},
                                        "import_s": t2 - t1, "total_s": t2 - t0})
    finally:
        for parent in pipes.values():
            parent.send(None)
        for proc in procs:
            proc.join(30)
    _print_fixed_cost(rows, reps, num_tokens, gap_ms)


def _print_fixed_cost(rows: dict[str, list[dict[str, float]]], reps: int, num_tokens: int, gap_ms: float) -> None:
    mib = num_tokens * 2 * SMOLLM2["num_layers"] * SMOLLM2["num_kv_heads"] * SMOLLM2["head_dim"] * 4 / 2**20
    print(f"\none hand-off's pull + import, demo shape (TP1 float32, {num_tokens} tokens = {mib:.1f} MiB, shm), "
          f"p50 ms of {reps} interleaved pulls each, {gap_ms:g} ms from offer to pull")
    print(f"{'phase':>14} " + " ".join(f"{label:>8}" for label in rows))
    for phase in FIXED_COST_PHASES:
        cells = [statistics.median(r[phase] for r in rows[label]) * 1e3 for label in rows]
        print(f"{phase.removesuffix('_s'):>14} " + " ".join(f"{c:>8.2f}" for c in cells))
    print("fresh: new tensors and a new segment mapping per pull, bytes staged at pull time; reused: receive "
          "buffers given back after the import, the mapping kept; ahead: reused, and the sender stages each "
          "offer's bytes into shm right after the offer")


def part2(engines_dir: Path, samples: int, prompt_tokens: list[int]) -> None:
    import tritonclient.grpc as grpcclient

    from trt_disagg.config import load_deployment
    from trt_disagg.contract import Role
    from trt_disagg.triton.cluster import LocalCluster

    dep = load_deployment(REPO / "configs" / "smollm2.yaml")
    if not (engines_dir / "smollm2" / "decode" / "config.json").is_file():
        from trt_disagg.engine_build.builder import build_deployment

        print(f"building SmolLM2 engines into {engines_dir} ...")
        build_deployment(dep, engines_root=engines_dir, roles=["prefill", "decode"])
    dep = dep.model_copy(update={"colocated_servers": None})
    with LocalCluster(dep, engines_root=engines_dir, start_router=False) as cluster:
        ends = {e.role: e for e in cluster.endpoints()}
        print(f"\nhand-off latency: prefill response received -> first decode token received "
              f"(SmolLM2, prefill TP2 -> decode PP2, transport auto = shm, {samples} requests each)")
        print(f"{'prompt':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for n in prompt_tokens:
            lat = []
            for i in range(samples):
                prompt = [(i * 131 + k * 7) % 40000 + 100 for k in range(n)]
                client = grpcclient.InferenceServerClient(ends[Role.PREFILL].grpc_url)
                try:
                    r = client.infer("prefill", client_inputs(grpcclient, prompt, 4, None, streaming=True),
                                     parameters={"request_type": "context_only"})
                finally:
                    client.close()
                handle = r.as_numpy("context_phase_params").tobytes()
                t_prefill_done = time.perf_counter()
                first_token_at = _first_decode_token_at(ends[Role.DECODE].grpc_url, prompt, 4, handle)
                lat.append((first_token_at - t_prefill_done) * 1000)
            lat.sort()
            p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
            print(f"{n:>7} {statistics.median(lat):>8.1f} {p99:>8.1f} {lat[-1]:>8.1f}")


def _first_decode_token_at(url: str, prompt: list[int], n: int, handle: bytes) -> float:
    """Stream a generation_only request; perf_counter() when its first token arrived (drains the rest)."""
    import queue

    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((time.perf_counter(), result, error)))
    first: float | None = None
    try:
        client.async_stream_infer("decode", client_inputs(grpcclient, prompt, n, handle, streaming=True),
                                  parameters={"request_type": "generation_only"}, enable_empty_final_response=True)
        while True:
            at, result, error = responses.get(timeout=120)
            if error is not None:
                raise RuntimeError(f"decode failed: {error}")
            if first is None and result.as_numpy("output_ids") is not None and result.as_numpy("output_ids").size:
                first = at
            if result.get_response().parameters["triton_final_response"].bool_param:
                assert first is not None
                return first
    finally:
        client.stop_stream()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--handoff-samples", type=int, default=20, help="0 skips part 2")
    parser.add_argument("--handoff-prompts", type=int, nargs="+", default=[128, 512, 1000])
    parser.add_argument("--engines-dir", type=Path, default=REPO / "engines")
    parser.add_argument("--gap-ms", type=float, default=2.0, help="fixed cost: offer -> pull (the router's dispatch)")
    parser.add_argument("--fixed-cost-only", action="store_true",
                        help="only the fresh-vs-reused fixed cost of a demo-shaped pull (no Triton, ~10 s)")
    parser.add_argument("--multihost", action="store_true",
                        help="instead: KV across two network namespaces joined by a 1 Gbit/s, 2 ms link (root)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "kv_transfer_multihost.json",
                        help="--multihost: the JSON results file")
    args = parser.parse_args()
    if args.multihost:
        from benchmarks.kv_multihost import run

        run(args.engines_dir, args.reps, args.out)
        return
    if args.fixed_cost_only:
        fixed_cost(args.reps, gap_ms=args.gap_ms)
        return
    part1(args.reps)
    fixed_cost(args.reps, gap_ms=args.gap_ms)
    if args.handoff_samples:
        part2(args.engines_dir, args.handoff_samples, args.handoff_prompts)


if __name__ == "__main__":
    main()
