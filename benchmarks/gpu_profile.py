"""The engine's prefill and decode step times on one device, next to the planner's roofline estimate.

    python3 benchmarks/gpu_profile.py                       # CUDA: Llama-3-8B shape, bf16, random weights
    python3 benchmarks/gpu_profile.py --dry-run             # the same code on the CPU, a tiny shape, seconds
    python3 benchmarks/gpu_profile.py --out runs/gpu_profile.json --batches 1,8,32,64 --lengths 128,512,2048
    python3 benchmarks/gpu_profile.py --tiny --check-tokens  # + greedy tokens on CUDA == on the CPU (exit 1 if not)

It builds the engine (trt_disagg/engine: the same LLMEngine, scheduler, paged KV and sampling that serve
requests) from random weights held in memory, so no model files are read. For each batch size b and prompt
length n it adds b requests of n random tokens, times the step that prefills them (when they fit one step:
b * n <= --max-prefill-tokens) and then --decode-steps decode steps; the fastest of --repeats rounds is kept.
Two times per step: the whole `engine.step()` (scheduling, input tensors, forward, sampling; the device is
synchronized before and after) and the forward pass alone (CUDA events; wall clock on the CPU). Beside them,
the planner's roofline estimate (trt_disagg/planner/roofline.py) for the same shape, dtype and GPU, and the
ratio measured / roofline per row. Output: a table on stdout and a JSON file (--out).

What it needs, on purpose nothing else: Python >= 3.11, torch (with CUDA for a GPU run), and this
repository's trt_disagg/ package beside benchmarks/ (1-2 MiB). The modules it imports use only torch and the
standard library: no numpy, pydantic, yaml, safetensors or transformers (tests/unit/benchmarks/
test_gpu_profile.py runs the dry run with those blocked). To run it on a machine without this checkout:

    tar czf trtd-gpu-profile.tgz trt_disagg benchmarks/gpu_profile.py
    # on the GPU machine:
    tar xzf trtd-gpu-profile.tgz && python3 benchmarks/gpu_profile.py --out gpu_profile.json

Llama-3-8B in bf16 takes ~16 GiB of weights plus the KV cache for the largest batch (64 x 2k tokens:
~16 GiB): one 40 GiB or larger GPU. A smaller GPU: --model smollm2-135m or fewer/shorter batches.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trt_disagg.contract import ModelShape, RequestType, Role, SamplingParams, tp_slices  # noqa: E402
from trt_disagg.engine.device import check_device, rank_device, synchronize  # noqa: E402
from trt_disagg.engine.llm_engine import LLMEngine  # noqa: E402
from trt_disagg.engine.model import RankModel  # noqa: E402
from trt_disagg.engine.runner import LocalRunner  # noqa: E402
from trt_disagg.engine.step_input import StepInput  # noqa: E402
from trt_disagg.engine.types import FinishReason  # noqa: E402
from trt_disagg.engine_dir import EngineConfig, EngineLimits, KVCacheSpec  # noqa: E402
from trt_disagg.errors import UserError  # noqa: E402
from trt_disagg.planner.hardware import get_gpu  # noqa: E402
from trt_disagg.planner.models import MODELS, ModelSpec  # noqa: E402
from trt_disagg.planner.roofline import roofline_coefficients  # noqa: E402

TOKENS_PER_BLOCK = 16
# The dry run's model: the unit tests' tiny Llama proportions, small enough for a CPU step in milliseconds.
TINY_SHAPE = ModelShape(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                        vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=False)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# torch.cuda.get_device_name() fragments -> the planner's GPU names (trt_disagg/planner/hardware.py).
GPU_NAMES = (("h200", "h200"), ("h100", "h100-sxm"), ("a100-sxm4-40gb", "a100-40g"), ("a100", "a100-80g"),
             ("l40s", "l40s"))


@dataclass(frozen=True)
class Row:
    """One profiled grid point, measured and estimated."""

    phase: str  # prefill | decode
    batch: int
    prompt_len: int  # tokens per prompt (decode: the prompt its sequences started from)
    num_tokens: int  # tokens computed in the step: the prompts (prefill), one per sequence (decode)
    sum_context: int  # KV tokens attended over, all sequences
    step_s: float  # the whole engine.step(), fastest round
    forward_s: float  # its forward pass alone, same round
    roofline_s: float  # the planner's estimate for this step

    @property
    def ratio(self) -> float:
        return self.step_s / self.roofline_s


class TimedRunner:
    """The engine's runner, with each forward pass timed: CUDA events on a GPU (the kernels' time, without
    host work), wall clock on the CPU. Everything else passes through."""

    def __init__(self, inner: LocalRunner, device: torch.device) -> None:
        self.inner = inner
        self.device = device
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._wall_s = 0.0

    def forward(self, step: StepInput) -> torch.Tensor:
        if self.device.type != "cuda":
            start = time.perf_counter()
            logits = self.inner.forward(step)
            self._wall_s = time.perf_counter() - start
            return logits
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        logits = self.inner.forward(step)
        end.record()
        self._events = (begin, end)
        return logits

    def last_forward_s(self) -> float:
        """Seconds of the last forward pass (call after the step: its sampling has synchronized)."""
        if self._events is None:
            return self._wall_s
        begin, end = self._events
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    def read_kv(self, slots: list[int]) -> dict[int, torch.Tensor]:
        return self.inner.read_kv(slots)

    def write_kv(self, slots: list[int], shards: dict[int, torch.Tensor]) -> None:
        self.inner.write_kv(slots, shards)

    def failure(self) -> str | None:
        return self.inner.failure()

    def shutdown(self) -> None:
        self.inner.shutdown()


def random_weights(shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face Llama names, N(0, 0.02) matrices and unit norms, made on the device (8B in about a second
    on a GPU; no host copy of 16 GiB)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, inter, d = shape.hidden_size, shape.intermediate_size, shape.head_dim

    def mat(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)

    w = {"model.embed_tokens.weight": mat(shape.vocab_size, h), "lm_head.weight": mat(shape.vocab_size, h),
         "model.norm.weight": torch.ones(h, dtype=dtype, device=device)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            p + "self_attn.q_proj.weight": mat(shape.num_heads * d, h),
            p + "self_attn.k_proj.weight": mat(shape.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": mat(shape.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": mat(h, shape.num_heads * d),
            p + "mlp.gate_proj.weight": mat(inter, h),
            p + "mlp.up_proj.weight": mat(inter, h),
            p + "mlp.down_proj.weight": mat(h, inter),
        })
    return w


def engine_config(shape: ModelShape, dtype: str, batches: list[int], lengths: list[int], decode_steps: int,
                  max_prefill_tokens: int) -> EngineConfig:
    """Limits that admit every grid point at once: each request reserves prompt + new tokens of KV."""
    max_batch, max_len = max(batches), max(lengths)
    blocks_per_seq = -(-(max_len + decode_steps + 2) // TOKENS_PER_BLOCK)
    return EngineConfig(
        role=Role.COLOCATED, shape=shape, tp=1, pp=1, dtype=dtype,
        limits=EngineLimits(max_batch_size=max_batch, max_input_len=max_len,
                            max_seq_len=max_len + decode_steps + 8,
                            max_num_tokens=max(max_prefill_tokens, max_len)),
        kv_cache=KVCacheSpec(dtype=dtype, tokens_per_block=TOKENS_PER_BLOCK,
                             max_tokens=max_batch * blocks_per_seq * TOKENS_PER_BLOCK, enable_block_reuse=False),
        fingerprint="random-weights",
    )


def build_engine(cfg: EngineConfig, device: torch.device, seed: int,
                 weights_on: torch.device | None = None) -> tuple[LLMEngine, TimedRunner]:
    """The serving engine with its weights from memory: RankModel -> LocalRunner -> LLMEngine. The weights
    are drawn on `weights_on` (default: the device) and moved: equal seeds draw equal weights per device."""
    torch_dtype = getattr(torch, cfg.dtype)
    weights = random_weights(cfg.shape, torch_dtype, weights_on or device, seed)
    weights = {name: t.to(device) for name, t in weights.items()}
    model = RankModel(cfg.shape, weights, tp_slice=tp_slices(cfg.shape, 1)[0], layers=range(cfg.shape.num_layers),
                      is_first_stage=True, is_last_stage=True,
                      num_kv_slots=cfg.kv_cache.num_blocks * cfg.kv_cache.tokens_per_block,
                      kv_dtype=torch_dtype, max_positions=cfg.limits.max_seq_len, device=device)
    del weights  # the model holds its own (fused) copies of the projections
    if device.type == "cuda":
        torch.cuda.empty_cache()
    runner = TimedRunner(LocalRunner(cfg, model), device)
    return LLMEngine(cfg, runner, block_reuse=False), runner


def timed_step(engine: LLMEngine, runner: TimedRunner, device: torch.device) -> tuple[list, float, float]:
    """(events, whole step seconds, forward seconds) of one engine step, the device idle before and after."""
    synchronize(device)
    start = time.perf_counter()
    events = engine.step()
    synchronize(device)
    return events, time.perf_counter() - start, runner.last_forward_s()


def one_round(engine: LLMEngine, runner: TimedRunner, device: torch.device, batch: int, length: int,
              decode_steps: int, rng: random.Random, tag: str) -> list[tuple[str, int, int, float, float]]:
    """Prefill `batch` prompts of `length` random tokens, then decode; one (phase, tokens, context, step_s,
    forward_s) per step: the prefill only when one step took every prompt."""
    vocab = engine.config.shape.vocab_size
    ids = [f"{tag}-{i}" for i in range(batch)]
    sampling = SamplingParams(max_new_tokens=decode_steps + 2, ignore_eos=True)
    for rid in ids:
        engine.add_request(rid, [rng.randrange(1, vocab) for _ in range(length)], sampling,
                           RequestType.CONTEXT_AND_GENERATION)
    out = []
    try:
        started: set[str] = set()
        prefill_steps = 0
        while len(started) < batch:
            events, step_s, forward_s = timed_step(engine, runner, device)
            _check(events)
            prefill_steps += 1
            started.update(e.request_id for e in events)
            if prefill_steps == 1 and len(started) == batch and engine.last_step is not None:
                out.append(("prefill", engine.last_step.num_tokens, engine.last_step.sum_context, step_s, forward_s))
        for _ in range(decode_steps):
            events, step_s, forward_s = timed_step(engine, runner, device)
            _check(events)
            stats = engine.last_step
            if stats is None or stats.kind != "decode" or stats.num_seqs != batch:
                break
            out.append(("decode", stats.num_tokens, stats.sum_context, step_s, forward_s))
    finally:
        for rid in ids:
            engine.abort(rid)
    return out


def _check(events: list) -> None:
    failed = [e for e in events if e.finish_reason is FinishReason.FAILED]
    if failed:
        raise RuntimeError(f"{len(failed)} sequence(s) failed in sampling (random weights gave non-finite "
                           f"logits?): {failed[0].error}")


def profile(engine: LLMEngine, runner: TimedRunner, device: torch.device, args: argparse.Namespace,
            model: ModelSpec, gpu_name: str) -> list[Row]:
    """Every grid point: warm-up rounds untimed, then the fastest of `repeats` rounds per (phase, step)."""
    coeffs = roofline_coefficients(model, get_gpu(gpu_name), tp=1)
    rng = random.Random(args.seed)
    rows: list[Row] = []
    for batch in args.batches:
        for length in args.lengths:
            for r in range(args.warmup):
                one_round(engine, runner, device, batch, length, 1, rng, f"w{batch}x{length}r{r}")
            best: dict[tuple[str, int], tuple[int, int, float, float]] = {}
            for r in range(args.repeats):
                steps = one_round(engine, runner, device, batch, length, args.decode_steps, rng,
                                  f"t{batch}x{length}r{r}")
                for k, (phase, tokens, ctx, step_s, forward_s) in enumerate(steps):
                    key = (phase, k)
                    if key not in best or step_s < best[key][2]:
                        best[key] = (tokens, ctx, step_s, forward_s)
            rows.extend(_rows_of(best, batch, length, coeffs, args.max_prefill_tokens))
    return rows


def _rows_of(best: dict, batch: int, length: int, coeffs, max_prefill_tokens: int) -> list[Row]:
    """One prefill row (when it fit one step) and one decode row: the median of the decode steps' bests, at
    their median context (a decode step's context grows by `batch` tokens a step)."""
    rows = []
    prefill = [v for (phase, _), v in best.items() if phase == "prefill"]
    if prefill and batch * length <= max_prefill_tokens:
        tokens, ctx, step_s, forward_s = prefill[0]
        rows.append(Row("prefill", batch, length, tokens, ctx, step_s, forward_s,
                        coeffs.prefill_s(batch * length, batch * length * length)))
    decode = sorted((v for (phase, _), v in best.items() if phase == "decode"), key=lambda v: v[1])
    if decode:
        tokens, ctx, _, _ = decode[len(decode) // 2]
        step_s = statistics.median(v[2] for v in decode)
        forward_s = statistics.median(v[3] for v in decode)
        rows.append(Row("decode", batch, length, tokens, ctx, step_s, forward_s, coeffs.decode_step_s(batch, ctx)))
    return rows


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list]:
    """Each prompt's greedy tokens from one batch, and every step's logits on the host."""
    seen: list[torch.Tensor] = []
    engine.logits_hook = lambda ids, logits: seen.append(logits.float().cpu())
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        events = engine.step()
        _check(events)
        for e in events:
            out.setdefault(e.request_id, []).append(e.token_id)
    return [out[str(i)] for i in range(len(prompts))], seen


def check_tokens(device: torch.device, seed: int) -> dict:
    """The tiny shape in float32 with the same weights on the CPU and on `device`: greedy tokens must be
    identical (one engine code path); the largest logit difference says how close the kernels are."""
    cfg = engine_config(TINY_SHAPE, "float32", [4], [32], 8, 256)
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, TINY_SHAPE.vocab_size) for _ in range(n)] for n in (5, 17, 32, 1)]
    results = {}
    for where in (torch.device("cpu"), device):
        engine, _ = build_engine(cfg, where, seed, weights_on=torch.device("cpu"))
        try:
            results[where.type] = greedy_tokens(engine, prompts, 8)
        finally:
            engine.shutdown()
    (cpu_tokens, cpu_logits), (dev_tokens, dev_logits) = results["cpu"], results[device.type]
    diff = max(float((a - b).abs().max()) for a, b in zip(cpu_logits, dev_logits, strict=True))
    identical = cpu_tokens == dev_tokens
    print(f"greedy tokens on {device} vs cpu (tiny shape, float32, same weights): "
          f"{'identical' if identical else 'DIFFERENT'}; max |logit difference| {diff:.2e}")
    return {"identical": identical, "max_logit_diff": diff, "cpu_tokens": cpu_tokens, "device_tokens": dev_tokens}


def gpu_for(device: torch.device, requested: str | None) -> str:
    """The planner's name for the device: --gpu, else from the CUDA device's name; the CPU is "cpu"."""
    if requested:
        return get_gpu(requested).name
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace(" ", "-")
    for fragment, planner_name in GPU_NAMES:
        if fragment in name:
            return planner_name
    raise UserError(f"--gpu: the planner does not know {torch.cuda.get_device_name(device)!r}; name the "
                    "closest known GPU (see trt_disagg/planner/hardware.py)")


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print(f"{'phase':8} {'batch':>5} {'prompt':>6} {'tokens':>7} {'context':>8} {'step ms':>9} "
          f"{'forward ms':>10} {'roofline ms':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r.phase:8} {r.batch:5d} {r.prompt_len:6d} {r.num_tokens:7d} {r.sum_context:8d} "
              f"{r.step_s * 1e3:9.2f} {r.forward_s * 1e3:10.2f} {r.roofline_s * 1e3:11.2f} {r.ratio:6.2f}")
    print("ratio = step / roofline (> 1: slower than the planner's roofline estimate)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the CPU and the tiny shape (= --device cpu --tiny)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda; cpu with --dry-run)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test shape instead of --model")
    ap.add_argument("--model", default="llama-3-8b", help=f"a Llama-family shape the planner knows: "
                    f"{', '.join(n for n in MODELS if not n.startswith('opt'))}")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES),
                    help="weights and KV (default: bfloat16; float32 with --tiny)")
    ap.add_argument("--gpu", default=None, help="the planner's GPU for the roofline (default: from the device)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32,64)")
    ap.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default 128,512,2048)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per round (default 8)")
    ap.add_argument("--max-prefill-tokens", type=int, default=8192, help="largest prefill batch profiled (tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-tokens", action="store_true", help="first compare greedy tokens of the tiny shape "
                    "on the device with the CPU's (exit 1 when they differ)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_profile.json")
    args = ap.parse_args(argv)
    return _resolve_defaults(args)


def _resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    tiny_run = args.dry_run or args.tiny
    args.tiny = tiny_run
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.dtype = args.dtype or ("float32" if tiny_run else "bfloat16")
    args.batches = _ints(args.batches or ("1,2" if tiny_run else "1,8,32,64"), "--batches")
    args.lengths = _ints(args.lengths or ("16,48" if tiny_run else "128,512,2048"), "--lengths")
    args.decode_steps = args.decode_steps or (2 if tiny_run else 8)
    if args.repeats < 1 or args.warmup < 0 or args.decode_steps < 1:
        raise UserError("--repeats and --decode-steps must be >= 1, --warmup >= 0")
    return args


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text!r}: give one or more integers >= 1")
    return values


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The shape to build, with the dtype's bytes (the roofline reads weights and KV at that width)."""
    if args.tiny:
        return ModelSpec("tiny", TINY_SHAPE, TINY_SHAPE.num_params(), None, DTYPE_BYTES[args.dtype])
    spec = MODELS.get(args.model.lower())
    if spec is None or args.model.lower().startswith("opt"):
        raise UserError(f"--model {args.model!r}: not a Llama-family model the planner knows")
    return ModelSpec(spec.name, spec.shape, spec.num_params, spec.hf_name, DTYPE_BYTES[args.dtype])


def run(args: argparse.Namespace) -> dict:
    """Build, profile, print, write the JSON; returns what it wrote."""
    check_device(args.device, 1, "--device")
    device = rank_device(args.device, 0)
    model = model_spec(args)
    gpu_name = gpu_for(device, args.gpu)
    cfg = engine_config(model.shape, args.dtype, args.batches, args.lengths, args.decode_steps,
                        args.max_prefill_tokens)
    token_check = check_tokens(device, args.seed) if args.check_tokens else None
    t0 = time.perf_counter()
    engine, runner = build_engine(cfg, device, args.seed)
    build_s = time.perf_counter() - t0
    try:
        rows = profile(engine, runner, device, args, model, gpu_name)
    finally:
        engine.shutdown()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print_table(rows, f"{model.name} ({args.dtype}, random weights) on {args.device} [{where}]; roofline: "
                      f"{gpu_name}; engine built in {build_s:.1f}s")
    result = {
        "model": model.name, "shape": model.shape.to_dict(), "dtype": args.dtype, "device": args.device,
        "device_name": where, "roofline_gpu": gpu_name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "build_s": build_s,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
        "token_check": token_check,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        result = run(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    check = result["token_check"]
    return 1 if check is not None and not check["identical"] else 0


if __name__ == "__main__":
    sys.exit(main())
