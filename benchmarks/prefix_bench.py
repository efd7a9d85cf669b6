"""Prefix reuse on multi-turn conversations: `least_loaded` vs `kv_aware` routing, SmolLM2, same trace.

    .venv/bin/python benchmarks/prefix_bench.py [--conversations 40] [--rate 0.1] [--think-s 2]
                                                [--out runs/prefix_bench.json]

A real deployment (tritonserver instances, router, Valkey) of SmolLM2-135M on the CPU engine with block
reuse on, two decode-capable (colocated) instances. The ShareGPT conversation trace (>= 3 turns each,
Poisson conversation starts, a think time between turns, each turn = the history + the answer the server
actually returned + the next user message) runs once per policy, each on a fresh deployment (cold caches).

Per policy it prints:
  hit rate        prompt tokens taken from a prefix cache / prompt tokens prefilled (the instances'
                  iteration logs: reused_tokens and num_tokens of every prefill step)
  / ideal         that, over the hit rate of one infinite cache seeing the same prompts and answers (every
                  earlier prompt, and every earlier prompt + its answer as the next turn's template spells it)
  TTFT p50 / p90  client side, every turn
  prefill tokens  computed (not reused) prompt tokens, all instances
  goodput         turns per second that met both SLOs (config slo), at this one conversation rate
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trt_disagg.bench.conversation import ConversationRun, run_conversations
from trt_disagg.bench.loadgen import make_client
from trt_disagg.bench.metrics import attains, percentiles, ttft_s
from trt_disagg.config import Deployment, dump_deployment, parse_deployment
from trt_disagg.engine_build.builder import build_deployment
from trt_disagg.engine_dir import load_tokenizer
from trt_disagg.kv_events import block_hashes
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.workload.conversations import conversation_starts, pick_conversations
from trt_disagg.workload.datasets import sharegpt_conversations

console = Console()
TPB = 16
POLICIES = ("least_loaded", "kv_aware")


def deployment(policy: str, max_local_prefill_length: int, engines_root: Path) -> Deployment:
    group = {"num_instances": 2, "max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 1152,
             "max_num_tokens": 2048, "threads_per_instance": 1,
             "kv_cache_config": {"tokens_per_block": TPB, "max_tokens": 8192, "enable_block_reuse": True}}
    return parse_deployment({
        "name": "smollm2-prefix", "model": {"source": "gguf"}, "colocated_servers": group,
        "slo": {"ttft_s": 2.0, "tpot_s": 0.25},
        "router": {"policy": policy, "max_local_prefill_length": max_local_prefill_length, "port": 0},
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
        ids = _chat_ids(tok, t.messages)
        hashes = block_hashes(ids, TPB, salt)[: (len(ids) - 1) // TPB]
        n = 0
        while n < len(hashes) and hashes[n] in seen:
            n += 1
        total, hit = total + len(ids), hit + n * TPB
        seen.update(block_hashes(ids, TPB, salt))
        if t.answer:
            seen.update(block_hashes(ids + tok(t.answer, add_special_tokens=False)["input_ids"], TPB, salt))
    return total, hit


def _chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return [int(t) for t in (out["input_ids"] if hasattr(out, "keys") else out)]


async def one_policy(policy: str, args: argparse.Namespace, engines_root: Path, convs: list, starts: Any,
                     tok: Any) -> dict[str, Any]:
    dep = deployment(policy, args.max_local_prefill_length, engines_root)
    run_dir = Path(tempfile.mkdtemp(prefix=f"prefix-bench-{policy}-"))
    config = run_dir / "deployment.yaml"  # the router process reads it
    config.write_text(dump_deployment(dep))
    cluster = LocalCluster(dep, config_path=config, engines_root=engines_root, iteration_logs=True,
                           run_dir=run_dir, ready_timeout_s=600)
    cluster.start()
    try:
        assert cluster.router_url is not None
        async with make_client(request_timeout_s=900) as client:
            run = await run_conversations(client, cluster.router_url, dep.name, convs, starts, think_s=args.think_s)
    finally:
        cluster.stop()
    salt = json.loads((engines_root / dep.name / "colocated" / "config.json").read_text())["fingerprint"].encode()
    tokens = prefill_tokens(run_dir)
    total, ideal = ideal_hit_tokens(run, tok, salt)
    records = run.records
    ok = [r for r in records if r.ok]
    ttft = percentiles(ttft_s(r) for r in records)
    hit_rate = tokens["reused"] / max(1, tokens["computed"] + tokens["reused"])
    ideal_rate = ideal / max(1, total)
    return {"policy": policy, "turns": len(records), "ok": len(ok), "hit_rate": hit_rate, "ideal_hit_rate": ideal_rate,
            "hit_vs_ideal": hit_rate / ideal_rate if ideal_rate else None, "prefill_tokens_computed": tokens["computed"],
            "prefill_tokens_reused": tokens["reused"], "ttft_p50_s": ttft.p50 if ttft else None,
            "ttft_p90_s": ttft.p90 if ttft else None, "duration_s": run.duration_s,
            "slo_attainment": sum(attains(r, dep.slo) for r in records) / max(1, len(records)),
            "goodput_rps": sum(attains(r, dep.slo) for r in records) / run.duration_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--min-turns", type=int, default=3)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.1, help="conversations per second (Poisson)")
    ap.add_argument("--think-s", type=float, default=2.0)
    ap.add_argument("--max-answer-tokens", type=int, default=32)
    ap.add_argument("--max-local-prefill-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", type=Path, default=Path("engines"))
    ap.add_argument("--out", type=Path, default=Path("runs/prefix_bench.json"))
    args = ap.parse_args()

    build_deployment(deployment("kv_aware", 0, args.engines), engines_root=args.engines)
    tok = load_tokenizer(args.engines / "smollm2-prefix" / "colocated")
    convs = pick_conversations(sharegpt_conversations(), num=args.conversations, min_turns=args.min_turns,
                               max_turns=args.max_turns, max_prompt_tokens=900,
                               max_answer_tokens=args.max_answer_tokens, seed=args.seed,
                               count=lambda text: len(tok(text, add_special_tokens=False)["input_ids"]))
    starts = conversation_starts(len(convs), args.rate, args.seed)
    results = [asyncio.run(one_policy(p, args, args.engines, convs, starts, tok)) for p in POLICIES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    table = Table(title=f"prefix reuse, {len(convs)} conversations ({sum(c.num_turns for c in convs)} turns)")
    for col in ("policy", "ok/turns", "hit rate", "/ ideal", "TTFT p50", "TTFT p90", "prefill computed",
                "attain", "goodput"):
        table.add_column(col)
    for r in results:
        table.add_row(r["policy"], f"{r['ok']}/{r['turns']}", f"{r['hit_rate']:.1%}",
                      f"{r['hit_vs_ideal']:.1%}" if r["hit_vs_ideal"] else "-", f"{r['ttft_p50_s']:.3f}s",
                      f"{r['ttft_p90_s']:.3f}s", str(r["prefill_tokens_computed"]), f"{r['slo_attainment']:.0%}",
                      f"{r['goodput_rps']:.3f}/s")
    console.print(table)


if __name__ == "__main__":
    main()
