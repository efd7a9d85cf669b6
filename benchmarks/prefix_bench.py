"""Prefix reuse on multi-turn conversations, measured and predicted: no reuse, `least_loaded` and `kv_aware`
routing with reuse, SmolLM2, the same conversations.

    flock /tmp/trtd-bench.lock .venv/bin/python benchmarks/prefix_bench.py [--conversations 20] [--rate 0.1]
        [--think-s 2] [--variants no_reuse,least_loaded,kv_aware] [--no-compare-sim] [--out-dir runs/prefix_bench]
    .venv/bin/python benchmarks/prefix_bench.py --predict-only     (the saved runs, predicted again: no serving)

A real deployment (tritonserver instances, router, Valkey) of SmolLM2-135M on the CPU engine, two
decode-capable (colocated) instances. The ShareGPT conversations (>= 3 turns each, Poisson conversation
starts, a think time between turns, each turn = the history + the answer the server actually returned + the
next user message) run once per variant, each on a fresh deployment (cold caches):

    no_reuse      kv_cache_config.enable_block_reuse: false, router.policy least_loaded
    least_loaded  block reuse on, router.policy least_loaded
    kv_aware      block reuse on, router.policy kv_aware (overlap against load)

Each run writes the per-turn trace it actually ran (trace_<variant>.json: send times, prompt and answer
tokens, measured TTFT, shared prefix measured on token ids), the format `trt-disagg simulate --trace` reads.
With --compare-sim (the default) the engine is profiled once (cached under the out dir, keyed by the engine's
fingerprint), and the simulator replays each trace under its variant's policy on that profile: measured vs
predicted TTFT (p50, mean, p90) with ratios, once with the latency model as profiled and once scaled by the
run's served / modelled engine step times (each instance's iteration log, every step priced as the simulator
prices it): on a shared machine the first says how far the load moved since profiling, the second what is
left for the simulator's queueing and routing to explain.

Per variant it prints:
  hit rate        prompt tokens taken from a prefix cache / prompt tokens prefilled (iteration logs)
  / ideal         that, over the hit rate of one infinite cache seeing the same prompts and answers
  TTFT p50 / p90  client side, every turn
  prefill tokens  computed (not reused) prompt tokens, all instances
  goodput         turns per second that met both SLOs (config slo), at this one conversation rate
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from trt_disagg.bench.conversation import ConversationRun, run_conversations
from trt_disagg.bench.conversation_dump import chat_ids, trace_document
from trt_disagg.bench.loadgen import make_client
from trt_disagg.bench.metrics import attains, percentiles, ttft_s
from trt_disagg.config import Deployment, dump_deployment, parse_deployment
from trt_disagg.contract import Role
from trt_disagg.demo.predict import profile, sim_spec
from trt_disagg.demo.served_steps import read_iteration_log
from trt_disagg.demo.targets import Busy, scaled_model
from trt_disagg.demo.variants import COLOCATED, Variant
from trt_disagg.engine_build.builder import build_deployment
from trt_disagg.engine_dir import EngineConfig, load_tokenizer
from trt_disagg.kv_events import block_hashes
from trt_disagg.planner.conversations import conversation_workload
from trt_disagg.planner.latency_model import LatencyModel
from trt_disagg.planner.profile import ProfileGrid
from trt_disagg.sim import PrefixReuse, Routing, simulate
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.workload.conversation_trace import ConversationTrace, load_conversation_trace
from trt_disagg.workload.conversations import conversation_starts, pick_conversations
from trt_disagg.workload.datasets import sharegpt_conversations

console = Console(width=200)
TPB = 16
NAME = "smollm2-prefix"
# The prompt lengths and batches the conversations produce (prompts up to ~900 tokens, 2 instances).
PROFILE_GRID = ProfileGrid(batch_sizes=(1, 2, 4), prompt_lens=(32, 128, 384, 768), repeats=2, warmup=1,
                           decode_steps=4)


@dataclass(frozen=True)
class BenchVariant:
    """One way to serve the conversations: the engine's block reuse and the router's policy."""

    label: str
    reuse: bool
    policy: str  # router.policy

    @property
    def name(self) -> str:
        """The deployment (and engine) name: block reuse is built into the engine's config."""
        return NAME if self.reuse else f"{NAME}-noreuse"

    def sim_reuse(self) -> PrefixReuse:
        return PrefixReuse(self.reuse, TPB, Routing(self.policy))


VARIANTS = {v.label: v for v in (BenchVariant("no_reuse", False, "least_loaded"),
                                 BenchVariant("least_loaded", True, "least_loaded"),
                                 BenchVariant("kv_aware", True, "kv_aware"))}


def deployment(variant: BenchVariant, max_local_prefill_length: int, engines_root: Path) -> Deployment:
    group = {"num_instances": 2, "max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 1152,
             "max_num_tokens": 2048, "threads_per_instance": 1,
             "kv_cache_config": {"tokens_per_block": TPB, "max_tokens": 8192, "enable_block_reuse": variant.reuse}}
    return parse_deployment({
        "name": variant.name, "model": {"source": "gguf"}, "colocated_servers": group,
        "slo": {"ttft_s": 2.0, "tpot_s": 0.25},
        "router": {"policy": variant.policy, "max_local_prefill_length": max_local_prefill_length, "port": 0},
        "engines_dir": str(engines_root.resolve()),
    })


def prefill_tokens(run_dir: Path) -> dict[str, int]:
    """Computed and reused prompt tokens over every prefill step of every instance (iteration logs)."""
    computed = reused = 0
    for log in run_dir.glob("*.iterations.jsonl"):
        for line in log.read_text().splitlines():
            step = json.loads(line)
            if step.get("kind") == "prefill":
                computed += int(step["num_tokens"])
                reused += int(step.get("reused_tokens", 0))
    return {"computed": computed, "reused": reused}


def ideal_hit_tokens(run: ConversationRun, tok: Any, salt: bytes) -> tuple[int, int]:
    """(prompt tokens, of them cacheable) for one infinite cache that saw every earlier prompt and answer."""
    seen: set[int] = set()
    total = hit = 0
    for t in sorted(run.turns, key=lambda t: t.record.sent_s):
        ids = chat_ids(tok, t.messages)
        hashes = block_hashes(ids, TPB, salt)[: (len(ids) - 1) // TPB]
        n = 0
        while n < len(hashes) and hashes[n] in seen:
            n += 1
        total, hit = total + len(ids), hit + n * TPB
        seen.update(block_hashes(ids, TPB, salt))
        if t.answer:
            seen.update(block_hashes(ids + tok(t.answer, add_special_tokens=False)["input_ids"], TPB, salt))
    return total, hit


async def one_variant(variant: BenchVariant, args: argparse.Namespace, convs: list, starts: Any,
                      tok: Any) -> dict[str, Any]:
    """Serve the conversations on a fresh deployment; the summary row, the trace written, the served steps."""
    dep = deployment(variant, args.max_local_prefill_length, args.engines)
    run_dir = args.out_dir / variant.label  # the deployment, the instances' logs and iteration logs
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = run_dir / "deployment.yaml"  # the router process reads it
    config.write_text(dump_deployment(dep))
    cluster = LocalCluster(dep, config_path=config, engines_root=args.engines, iteration_logs=True,
                           run_dir=run_dir, ready_timeout_s=600)
    cluster.start()
    try:
        assert cluster.router_url is not None
        async with make_client(request_timeout_s=900) as client:
            run = await run_conversations(client, cluster.router_url, dep.name, convs, starts, think_s=args.think_s)
    finally:
        cluster.stop()
    trace = args.out_dir / f"trace_{variant.label}.json"
    trace.write_text(json.dumps(trace_document(run, tok, tokens_per_block=TPB, policy=variant.policy,
                                               prefix_reuse=variant.reuse), indent=1))
    engine_dir = args.engines / dep.name / "colocated"
    salt = json.loads((engine_dir / "config.json").read_text())["fingerprint"].encode()
    tokens = prefill_tokens(run_dir)
    total, ideal = ideal_hit_tokens(run, tok, salt)
    records = run.records
    ttft = percentiles(ttft_s(r) for r in records)
    hit_rate = tokens["reused"] / max(1, tokens["computed"] + tokens["reused"])
    ideal_rate = ideal / max(1, total)
    return {"variant": variant.label, "turns": len(records), "ok": sum(r.ok for r in records),
            "hit_rate": hit_rate, "ideal_hit_rate": ideal_rate,
            "hit_vs_ideal": hit_rate / ideal_rate if ideal_rate else None, "prefill_tokens_computed": tokens["computed"],
            "prefill_tokens_reused": tokens["reused"], "ttft_p50_s": ttft.p50 if ttft else None,
            "ttft_p90_s": ttft.p90 if ttft else None, "ttft_mean_s": ttft.mean if ttft else None,
            "duration_s": run.duration_s,
            "slo_attainment": sum(attains(r, dep.slo) for r in records) / max(1, len(records)),
            "goodput_rps": sum(attains(r, dep.slo) for r in records) / run.duration_s,
            "trace": str(trace), "iteration_logs": [str(p) for p in sorted(run_dir.glob("*.iterations.jsonl"))]}


def engine_profile(engine_dir: Path, out_dir: Path) -> LatencyModel:
    """The served engine's latency model (one thread, as served): profiled once per engine build and grid,
    then read back from out_dir/profile.json (a profile takes minutes)."""
    key = f"{EngineConfig.load(engine_dir).fingerprint} {PROFILE_GRID}"
    stamp, path = out_dir / "profile.key", out_dir / "profile.json"
    if path.exists() and stamp.exists() and stamp.read_text() == key:
        return LatencyModel.from_json(path)
    console.print(f"profiling {engine_dir} (one thread; cached in {out_dir})")
    model = profile(engine_dir, NAME, 1, out_dir, grid=PROFILE_GRID).fit.latency_model
    stamp.write_text(key)
    return model


def served_ratios(logs: list[str], model: LatencyModel) -> Busy:
    """Served / modelled engine step time, median per phase over every instance's iteration log, each step
    priced as the simulator prices it: a prefill of x new tokens after m cached ones as prefill_s(x, x(x + 2m))
    (a batch's tokens spread evenly over its sequences), a decode step by its batch and context. How much
    faster or slower this machine ran while serving than while profiling, from the engine's own steps."""
    coeffs = model.for_tp(1)
    prefill, decode = [], []
    for path in logs:
        for row in read_iteration_log(Path(path)):
            if row["kind"] == "prefill":
                x, m, b = row["num_tokens"], row.get("reused_tokens", 0), max(1, row["num_seqs"])
                prefill.append(row["duration_s"] / coeffs.prefill_s(x, x * (x + 2 * m) / b))
            elif row["kind"] == "decode":
                decode.append(row["duration_s"] / coeffs.decode_step_s(row["num_seqs"], row["sum_context"]))
    return Busy(statistics.median(prefill) if prefill else 1.0, statistics.median(decode) if decode else 1.0,
                threshold=1.3)


def simulated_ttft(trace: ConversationTrace, variant: BenchVariant, model: LatencyModel,
                   engines: Path) -> tuple[np.ndarray, float]:
    """Per request TTFT the simulator gives the trace under the variant's deployment and policy, and its hit rate."""
    dep = deployment(variant, 0, engines)
    cfg = EngineConfig.load(dep.engine_dir(Role.COLOCATED, engines))
    spec = sim_spec(Variant(COLOCATED, dep), {Role.COLOCATED: cfg}, model)
    result = simulate(spec, conversation_workload(trace), reuse=variant.sim_reuse())
    matched = int(np.sum(result.matched_tokens)) if result.matched_tokens is not None else 0
    return result.ttft_s, matched / int(np.sum(trace.input_len))


def predict(row: dict[str, Any], variant: BenchVariant, model: LatencyModel, engines: Path) -> dict[str, Any]:
    """The simulator on the variant's own trace (same send times, token counts and shared prefixes) and policy:
    TTFT p50 / mean / p90 over the turns that completed, measured and predicted, with the latency model as
    profiled ("sim") and scaled by the served / modelled step times of this run ("sim served")."""
    trace = load_conversation_trace(row["trace"])
    assert trace.measured_ttft_s is not None  # the dump records every turn's TTFT
    have = ~np.isnan(trace.measured_ttft_s)
    busy = served_ratios(row["iteration_logs"], model)
    profiled, _ = simulated_ttft(trace, variant, model, engines)
    served, hit = simulated_ttft(trace, variant, scaled_model(model, 1, busy), engines)  # the run's own timing
    out: dict[str, Any] = {"variant": variant.label, "turns": int(have.sum()),
                           "measured_hit_rate": row["hit_rate"], "predicted_hit_rate": hit,
                           "served_prefill_ratio": busy.prefill_ratio, "served_decode_ratio": busy.decode_ratio}
    measured = trace.measured_ttft_s[have]
    for stat, fn in (("p50", np.median), ("mean", np.mean), ("p90", lambda a: np.percentile(a, 90))):
        m = float(fn(measured))
        out[f"measured_ttft_{stat}_s"] = m
        for label, ttft in (("sim", profiled), ("sim_served", served)):
            p = float(fn(ttft[have]))
            out.update({f"{label}_ttft_{stat}_s": p, f"{label}_ttft_{stat}_ratio": p / m})
    return out


def build(variants: list[BenchVariant], engines: Path) -> None:
    for v in variants:
        build_deployment(deployment(v, 0, engines), engines_root=engines)


def pick(args: argparse.Namespace, tok: Any) -> tuple[list, Any]:
    convs = pick_conversations(sharegpt_conversations(), num=args.conversations, min_turns=args.min_turns,
                               max_turns=args.max_turns, max_prompt_tokens=900,
                               max_answer_tokens=args.max_answer_tokens, seed=args.seed,
                               count=lambda text: len(tok(text, add_special_tokens=False)["input_ids"]))
    return convs, conversation_starts(len(convs), args.rate, args.seed)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--min-turns", type=int, default=3)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.1, help="conversations per second (Poisson)")
    ap.add_argument("--think-s", type=float, default=2.0)
    ap.add_argument("--max-answer-tokens", type=int, default=32)
    ap.add_argument("--max-local-prefill-length", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--compare-sim", action=argparse.BooleanOptionalAction, default=True,
                    help="profile the engine (cached) and set the simulator's TTFT on each trace beside the measured")
    ap.add_argument("--predict-only", action="store_true",
                    help="no serving: predict the runs saved in --out-dir again (their traces and iteration logs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", type=Path, default=Path("engines"))
    ap.add_argument("--out-dir", type=Path, default=Path("runs/prefix_bench"))
    args = ap.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (expected {', '.join(VARIANTS)})")
    return args


def main() -> None:
    args = parse_args()
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The reuse engine is always built: the tokenizer and the profiled engine are read from it.
    build(list({v.name: v for v in [VARIANTS["kv_aware"], *variants]}.values()), args.engines)
    reuse_engine = deployment(VARIANTS["kv_aware"], 0, args.engines).engine_dir(Role.COLOCATED, args.engines)
    model = engine_profile(reuse_engine, args.out_dir / "profile") if args.compare_sim else None
    out = args.out_dir / "prefix_bench.json"
    if args.predict_only:  # the runs of an earlier call: their traces and iteration logs, predicted again
        doc = json.loads(out.read_text())
        results = doc["results"]
        variants = [VARIANTS[r["variant"]] for r in results]
    else:
        tok = load_tokenizer(reuse_engine)
        convs, starts = pick(args, tok)
        results = [asyncio.run(one_variant(v, args, convs, starts, tok)) for v in variants]
        doc = {"args": {k: str(v) for k, v in vars(args).items()}, "conversations": len(convs),
               "turns": sum(c.num_turns for c in convs), "results": results}
    doc["predictions"] = [predict(r, v, model, args.engines) for r, v in zip(results, variants, strict=True)] \
        if model else []
    out.write_text(json.dumps(doc, indent=2))
    console.print(measured_table(results, doc["conversations"], doc["turns"]))
    if doc["predictions"]:
        console.print(prediction_table(doc["predictions"]))
    by = {r["variant"]: r for r in results}
    if "least_loaded" in by and "kv_aware" in by and by["kv_aware"]["ttft_p50_s"]:
        console.print(f"TTFT p50 least_loaded / kv_aware: "
                      f"{by['least_loaded']['ttft_p50_s'] / by['kv_aware']['ttft_p50_s']:.2f}x")


def measured_table(results: list[dict[str, Any]], conversations: int, turns: int) -> Table:
    table = Table(title=f"prefix reuse, {conversations} conversations ({turns} turns)")
    for col in ("variant", "ok/turns", "hit rate", "/ ideal", "TTFT p50", "TTFT mean", "TTFT p90",
                "prefill computed", "attain", "goodput"):
        table.add_column(col)
    for r in results:
        table.add_row(r["variant"], f"{r['ok']}/{r['turns']}", f"{r['hit_rate']:.1%}",
                      f"{r['hit_vs_ideal']:.1%}" if r["hit_vs_ideal"] else "-", f"{r['ttft_p50_s']:.3f}s",
                      f"{r['ttft_mean_s']:.3f}s", f"{r['ttft_p90_s']:.3f}s", str(r["prefill_tokens_computed"]),
                      f"{r['slo_attainment']:.0%}", f"{r['goodput_rps']:.3f}/s")
    return table


def prediction_table(predictions: list[dict[str, Any]]) -> Table:
    table = Table(title="TTFT measured vs simulated on each run's own trace, (simulated / measured); sim: the "
                  "profiled latency model, served: scaled by this run's served / modelled engine step times")
    for col in ("variant", "turns", "steps p/d"):
        table.add_column(col)
    for stat in ("p50", "mean", "p90"):
        for col in ("meas", "sim", "served"):
            table.add_column(f"{stat} {col}", justify="right")
    table.add_column("hit meas/sim", justify="right")
    for p in predictions:
        cells = [p["variant"], str(p["turns"]), f"{p['served_prefill_ratio']:.2f}/{p['served_decode_ratio']:.2f}"]
        for stat in ("p50", "mean", "p90"):
            cells.append(f"{p[f'measured_ttft_{stat}_s']:.3f}s")
            for label in ("sim", "sim_served"):
                cells.append(f"{p[f'{label}_ttft_{stat}_s']:.3f}s ({p[f'{label}_ttft_{stat}_ratio']:.2f})")
        table.add_row(*cells, f"{p['measured_hit_rate']:.1%}/{p['predicted_hit_rate']:.1%}")
    return table


if __name__ == "__main__":
    main()
