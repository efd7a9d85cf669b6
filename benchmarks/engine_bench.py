"""Our CPU engine vs Hugging Face transformers on SmolLM2-135M, side by side in one run.

    .venv/bin/python benchmarks/engine_bench.py [--threads 2] [--prompt-len 256] [--decode-steps 32]
    .venv/bin/python benchmarks/engine_bench.py --sampling-only     # the second table alone

Prints prefill tokens/s and decode tokens/s at batch 1 and batch 16 for both, with the ratio
(ours / transformers). Same weights (the GGUF, de-quantized to fp32), same torch thread count, TP1.
Targets: decode at batch 16 at least as fast as transformers; prefill within 1.25x.

Then our decode step at batch 8, greedy vs sampled (temperature 1, top_p 0.9: what most OpenAI clients
get, since they send no temperature), side by side. The prompts are real text (HumanEval's, cut to
--prompt-len tokens), so the sampled distributions are a model's, not the flat ones random tokens give.
Target: sampled step ≤ 1.1x the greedy step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from trt_disagg.config import ModelSource, parse_deployment
from trt_disagg.contract import SamplingParams
from trt_disagg.engine.llm_engine import LLMEngine
from trt_disagg.engine.weights import build_hf_reference
from trt_disagg.engine_build.builder import build_deployment
from trt_disagg.engine_dir import load_tokenizer
from trt_disagg.workload.datasets import humaneval_pairs

console = Console()
BATCHES = (1, 16)


def build_engine(root: Path, prompt_len: int, decode_steps: int) -> Path:
    max_batch = max(BATCHES)
    dep = parse_deployment({
        "name": "engine-bench",
        "model": {"source": "gguf"},
        "colocated_servers": {
            "max_batch_size": max_batch, "max_input_len": prompt_len, "max_seq_len": prompt_len + decode_steps + 8,
            "max_num_tokens": max_batch * prompt_len,
            "kv_cache_config": {"max_tokens": max_batch * (prompt_len + decode_steps + 16)},
        },
        "slo": {"ttft_s": 1, "tpot_s": 1},
    })
    build_deployment(dep, engines_root=root)
    return root / "engine-bench" / "colocated"


def prompts(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(100, vocab - 100, (batch, prompt_len), generator=g).tolist()


def bench_ours(engine: LLMEngine, batch: int, prompt_len: int, decode_steps: int, repeats: int,
               sampling: SamplingParams | None = None, ids: list[list[int]] | None = None) -> tuple[float, float]:
    """(prefill s, decode s per step), medians over repeats; greedy unless `sampling` says otherwise."""
    prefill_s, decode_s = [], []
    base = sampling or SamplingParams()
    for rep in range(repeats):
        ids = ids or prompts(batch, prompt_len, engine.config.shape.vocab_size)
        for i, p in enumerate(ids):
            params = dataclasses.replace(base, max_new_tokens=decode_steps + 1, ignore_eos=True,
                                         seed=None if base.greedy else rep * 1000 + i)
            engine.add_request(f"{rep}-{i}", p, params)
        t0 = time.perf_counter()
        events = engine.step()  # the whole batch's prefill
        prefill_s.append(time.perf_counter() - t0)
        assert len(events) == batch
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            engine.step()
        decode_s.append((time.perf_counter() - t0) / decode_steps)
        assert not engine.has_unfinished()
    return statistics.median(prefill_s), statistics.median(decode_s)


@torch.inference_mode()
def bench_hf(model, batch: int, prompt_len: int, decode_steps: int, repeats: int, vocab: int) -> tuple[float, float]:
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        ids = torch.tensor(prompts(batch, prompt_len, vocab))
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s.append(time.perf_counter() - t0)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s.append((time.perf_counter() - t0) / decode_steps)
    return statistics.median(prefill_s), statistics.median(decode_s)


SAMPLING_BATCH = 8
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)


def text_prompts(engine_dir: Path, batch: int, prompt_len: int) -> list[list[int]]:
    """HumanEval prompts, tokenized and cut to `prompt_len` tokens (repeated when shorter)."""
    tok = load_tokenizer(engine_dir)
    out = []
    for prompt, _ in humaneval_pairs()[:batch]:
        ids = tok.encode(prompt, add_special_tokens=False)
        out.append((ids * (prompt_len // len(ids) + 1))[:prompt_len])
    return out


def sampling_table(engine: LLMEngine, engine_dir: Path, args: argparse.Namespace) -> Table:
    """Our decode step at batch 8: greedy vs temperature 1 / top_p 0.9, interleaved repeats."""
    ids = text_prompts(engine_dir, SAMPLING_BATCH, args.prompt_len)
    greedy, sampled = [], []
    for _ in range(args.repeats):
        greedy.append(bench_ours(engine, SAMPLING_BATCH, args.prompt_len, args.decode_steps, 1, None, ids)[1])
        sampled.append(bench_ours(engine, SAMPLING_BATCH, args.prompt_len, args.decode_steps, 1, SAMPLED, ids)[1])
    g, s = statistics.median(greedy), statistics.median(sampled)
    table = Table(title=f"decode step, batch {SAMPLING_BATCH}, HumanEval prompts of {args.prompt_len} tokens, "
                        f"{args.decode_steps} steps (median of {args.repeats}); target sampled ≤ 1.1x greedy")
    for col in ("greedy step ms", "sampled step ms (T=1, top_p=0.9)", "sampled / greedy"):
        table.add_column(col, justify="right")
    table.add_row(f"{g * 1e3:.1f}", f"{s * 1e3:.1f}", f"{s / g:.3f}x")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sampling-only", action="store_true", help="only the greedy vs sampled table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        with console.status("building the SmolLM2 engine (TP1)"):
            engine_dir = build_engine(Path(tmp), args.prompt_len, args.decode_steps)
        with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=args.threads) as engine:
            bench_ours(engine, 1, 16, 2, 1)  # warm-up
            bench_ours(engine, 1, 16, 2, 1, SAMPLED)
            if not args.sampling_only:
                console.print(versus_transformers(engine, args))
            with console.status(f"greedy vs sampled, batch {SAMPLING_BATCH}"):
                console.print(sampling_table(engine, engine_dir, args))


def versus_transformers(engine: LLMEngine, args: argparse.Namespace) -> Table:
    hf = build_hf_reference(ModelSource(source="gguf"))
    vocab = engine.config.shape.vocab_size
    bench_hf(hf, 1, 16, 2, 1, vocab)
    rows = []
    for batch in BATCHES:
        with console.status(f"batch {batch}"):
            ours = bench_ours(engine, batch, args.prompt_len, args.decode_steps, args.repeats)
            ref = bench_hf(hf, batch, args.prompt_len, args.decode_steps, args.repeats, vocab)
        rows.append((batch, ours, ref))
    table = Table(title=f"SmolLM2-135M fp32, {args.threads} threads, prompt {args.prompt_len}, "
                        f"{args.decode_steps} decode steps (median of {args.repeats})")
    for col in ("batch", "phase", "ours tok/s", "transformers tok/s", "ours / transformers"):
        table.add_column(col, justify="right")
    for batch, (o_pre, o_dec), (h_pre, h_dec) in rows:
        pre_o, pre_h = batch * args.prompt_len / o_pre, batch * args.prompt_len / h_pre
        dec_o, dec_h = batch / o_dec, batch / h_dec
        table.add_row(str(batch), "prefill", f"{pre_o:,.0f}", f"{pre_h:,.0f}", f"{pre_o / pre_h:.2f}x")
        table.add_row(str(batch), "decode", f"{dec_o:,.1f}", f"{dec_h:,.1f}", f"{dec_o / dec_h:.2f}x")
    return table


if __name__ == "__main__":
    main()
