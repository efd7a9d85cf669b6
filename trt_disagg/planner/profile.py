"""`trt-disagg profile ENGINE_DIR`: time a real engine over a grid, fit the latency model, write both.

    for each (batch b, prompt length l) in the grid, after `warmup` untimed rounds, `repeats` times:
        prefill: add b CONTEXT_ONLY requests of l tokens, time each step() until all first tokens are out
                 -> PrefillSample(lengths that finished in that step, seconds); release their KV
        decode:  add b CONTEXT_AND_GENERATION requests of l tokens, step until all have a first token,
                 then time `decode_steps` steps -> DecodeSample(batch, sum of contexts, seconds); abort
    fit (fit.py, relative error) on the fastest of each grid point's repeats -> LatencyModel for the
    engine's TP, with max/mean relative error

Any object with the `LLMEngine` methods used here works (`EngineLike`), so the loop is tested with a fake
engine whose times follow known coefficients. Output files: `profile.csv` (every timed step) and
`profile.json` (grid, fitted `latency_model`, fit errors) in the output directory.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.errors import UserError
from trt_disagg.planner.fit import DecodeSample, FitReport, PrefillSample, fit_decode, fit_prefill
from trt_disagg.planner.latency_model import NO_THRESHOLD, LatencyModel, PhaseCoefficients

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    config: Any  # EngineConfig

    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                    request_type: RequestType = RequestType.CONTEXT_AND_GENERATION) -> None: ...

    def step(self) -> list[Any]: ...  # list[TokenEvent]

    def has_unfinished(self) -> bool: ...

    def abort(self, request_id: str) -> None: ...

    def release_kv(self, request_id: str) -> None: ...


@dataclass(frozen=True)
class ProfileGrid:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    prompt_lens: tuple[int, ...] = (16, 64, 128, 256)
    repeats: int = 5
    warmup: int = 1
    decode_steps: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserError("--batch-sizes: give one or more sizes >= 1")
        if not self.prompt_lens or min(self.prompt_lens) < 1:
            raise UserError("--lengths: give one or more lengths >= 1")
        if self.repeats < 1 or self.warmup < 0 or self.decode_steps < 1:
            raise UserError("--repeats and --decode-steps must be >= 1, --warmup >= 0")


@dataclass
class ProfileData:
    prefill: list[PrefillSample]
    decode: list[DecodeSample]


Progress = Callable[[int, int], None]


def grid_points(grid: ProfileGrid, max_batch: int, max_input_len: int, max_num_tokens: int,
                max_seq_len: int) -> list[tuple[int, int]]:
    """(batch, length) points the engine's build limits allow."""
    return [(b, n) for b in grid.batch_sizes for n in grid.prompt_lens
            if b <= max_batch and n <= max_input_len and b * n <= max_num_tokens
            and n + grid.decode_steps + 1 < max_seq_len]


def profile_engine(engine: EngineLike, grid: ProfileGrid, progress: Progress | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> ProfileData:
    """Time `engine` over `grid`; `clock` is injectable so a fake engine can report its own time."""
    limits = engine.config.limits
    points = grid_points(grid, limits.max_batch_size, limits.max_input_len, limits.max_num_tokens,
                         limits.max_seq_len)
    if not points:
        raise UserError(f"no grid point fits the engine's limits {limits}: use smaller --batch-sizes/--lengths")
    rng = np.random.default_rng(grid.seed)
    vocab = int(engine.config.shape.vocab_size)
    data = ProfileData([], [])
    rounds = grid.warmup + grid.repeats
    total, done = len(points) * rounds, 0
    for b, n in points:
        for r in range(rounds):
            timed = r >= grid.warmup
            prompts = [rng.integers(100, vocab, size=n).tolist() for _ in range(b)]
            tag = f"p{b}x{n}r{r}"
            p = _prefill_round(engine, prompts, tag, clock)
            d = _decode_round(engine, prompts, tag, grid.decode_steps, clock)
            if timed:
                data.prefill.extend(p)
                data.decode.extend(d)
            done += 1
            if progress is not None:
                progress(done, total)
    return data


def _prefill_round(engine: EngineLike, prompts: list[list[int]], tag: str,
                   clock: Callable[[], float]) -> list[PrefillSample]:
    ids = [f"{tag}-prefill-{i}" for i in range(len(prompts))]
    lengths = dict(zip(ids, (len(p) for p in prompts), strict=True))
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, SamplingParams(max_new_tokens=1), RequestType.CONTEXT_ONLY)
    samples, pending = [], set(ids)
    try:
        while pending:
            start = clock()
            events = engine.step()
            elapsed = clock() - start
            finished = [e.request_id for e in events if e.request_id in pending]
            if not finished and not engine.has_unfinished():
                raise RuntimeError(f"engine stopped with {len(pending)} prefill requests unfinished")
            if finished:
                samples.append(PrefillSample(tuple(lengths[r] for r in finished), elapsed))
            pending.difference_update(finished)
    finally:
        for rid in ids:
            engine.release_kv(rid)
            engine.abort(rid)
    return samples


def _decode_round(engine: EngineLike, prompts: list[list[int]], tag: str, steps: int,
                  clock: Callable[[], float]) -> list[DecodeSample]:
    ids = [f"{tag}-decode-{i}" for i in range(len(prompts))]
    context = dict(zip(ids, (len(p) for p in prompts), strict=True))
    sampling = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, sampling, RequestType.CONTEXT_AND_GENERATION)
    samples = []
    try:
        waiting_first = set(ids)
        while waiting_first:  # the prefill steps: not timed here
            events = engine.step()
            if not events and not engine.has_unfinished():
                raise RuntimeError("engine stopped before every decode request had its first token")
            for e in events:
                if e.request_id in context:
                    context[e.request_id] += 1
                    waiting_first.discard(e.request_id)
        for _ in range(steps):
            running = sum(context.values())
            start = clock()
            events = engine.step()
            elapsed = clock() - start
            mine = [e for e in events if e.request_id in context]
            if not mine:
                break
            samples.append(DecodeSample(len(mine), running, elapsed))
            for e in mine:
                context[e.request_id] += 1
    finally:
        for rid in ids:
            engine.abort(rid)
    return samples


@dataclass(frozen=True)
class ProfileFit:
    latency_model: LatencyModel
    reports: dict[str, FitReport]


def fastest(data: ProfileData) -> ProfileData:
    """One sample per grid point, the fastest of its repeats: on a shared machine interference only ever adds
    time, so the minimum is the best estimate of the engine's own time (timeit's rule)."""
    prefill: dict[tuple[int, ...], list[float]] = {}
    decode: dict[tuple[int, int], list[float]] = {}
    for p in data.prefill:
        prefill.setdefault(tuple(sorted(p.lengths)), []).append(p.time_s)
    for d in data.decode:
        decode.setdefault((d.batch, d.sum_ctx), []).append(d.time_s)
    return ProfileData([PrefillSample(k, min(v)) for k, v in prefill.items()],
                       [DecodeSample(b, c, min(v)) for (b, c), v in decode.items()])


def fit_profile(data: ProfileData, tp: int, model: str, device: str, source: str,
                decode_threshold: int | None = None) -> ProfileFit:
    """Fit the fastest repeat of each grid point; the reported errors are against those points.

    `decode_threshold` None picks it: no split, or a split after any profiled batch size, whichever fits
    the decode points with the lowest mean relative error. Why: on a CPU a decode step is not linear in the
    batch (oneDNN switches GEMM kernels: 56, 64, 104, 140 ms at batch 1, 2, 4, 8, short contexts, one core),
    and one line through all of it misses small batches by ~10%, which decides a tight TPOT SLO.
    """
    points = fastest(data)
    prefill = fit_prefill(points.prefill)
    candidates = [decode_threshold] if decode_threshold is not None else \
        [NO_THRESHOLD, *sorted({d.batch for d in points.decode})[:-1]]
    fits = {t: fit_decode(points.decode, t) for t in candidates}
    threshold = min(candidates, key=lambda t: _mean_decode_error(points.decode, t, *fits[t]))
    small, large = fits[threshold]
    coeffs = PhaseCoefficients(prefill.coefficients, small.coefficients, large.coefficients, threshold)
    return ProfileFit(LatencyModel(model, device, source, {tp: coeffs}),
                      {"prefill": prefill, "decode_small": small, "decode_large": large})


def _mean_decode_error(points: list[DecodeSample], threshold: int, small: FitReport, large: FitReport) -> float:
    errors = [abs((small if d.batch <= threshold else large).coefficients(d.sum_ctx, d.batch) - d.time_s) / d.time_s
              for d in points]
    return sum(errors) / len(errors)


def write_profile(out_dir: Path, data: ProfileData, fit: ProfileFit, grid: ProfileGrid, engine_dir: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "profile.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "batch", "sum_len", "sum_len_sq", "sum_ctx", "time_s"])
        for p in data.prefill:
            w.writerow(["prefill", len(p.lengths), sum(p.lengths), sum(n * n for n in p.lengths), "", p.time_s])
        for d in data.decode:
            w.writerow(["decode", d.batch, "", "", d.sum_ctx, d.time_s])
    result = {
        "engine_dir": engine_dir,
        "grid": asdict(grid),
        "latency_model": json.loads(fit.latency_model.to_json()),
        "fit": {k: {"num_samples": r.num_samples, "max_rel_error": r.max_rel_error,
                    "mean_rel_error": r.mean_rel_error} for k, r in fit.reports.items()},
    }
    (out_dir / "profile.json").write_text(json.dumps(result, indent=2))

