"""The latency model (DistServe §4): data plus pure functions.

    prefill batch time  = a + b * sum(l_i) + c * sum(l_i^2)            l_i: prompt tokens of request i
    decode step time    = a + b * sum(ctx_i) + c * batch                ctx_i: tokens in context of sequence i
                          (coefficient set `decode_small` when batch <= threshold, `decode_large` above)

Coefficients are per (model, GPU, TP degree) and come from one of three sources:
  published  the DistServe artifact's A100 fits for OPT-13B/66B (data/a100_opt_latency_coefficients.csv)
  roofline   peak FLOP/s, HBM bandwidth and link bandwidth of a GPU and the model's shape (`roofline.py`)
  profile    a `trt-disagg profile` run on a real engine, least-squares fitted (`fit.py`)

What a real engine adds to the kernels' time (`EngineOverheads`, set per latency source):
  per iteration   a fixed cost + a cost per context token in the batch (scheduling, input preparation,
                  launches, sampling). The published fits are used with DistServe's own simulator terms
                  (2 ms + 1e-4 ms per token every iteration, 1 ms x pp on each prefill stage); a profiled
                  engine's fit already holds its overheads, so a profile adds none.
  per stage       prefill: each of the pp stages pays pp x prefill_stage_s (DistServe's simulator: deeper
                  pipelines synchronise more ranks per batch, so the cost grows with pp); decode: every stage
                  a micro-batch step crosses pays decode_stage_s.

Pipeline parallelism (`InstanceTiming`): each of the pp stages holds 1/pp of the layers.
  prefill  a batch's kernels take 1/pp of the TP time per stage; the first stage also pays the iteration
           overhead (the scheduler prepares the batch before it starts) and every stage its stage cost, so
               stage_s   = kernels / pp + iteration overhead + pp * prefill_stage_s       (next batch enters)
               latency_s = kernels + iteration overhead + pp^2 * prefill_stage_s + (pp - 1) hops
  decode   up to pp micro-batches are in flight (the simulator runs one lane per micro-batch); each step of
           a micro-batch crosses every stage: the full TP kernel time + the iteration overhead + pp stage
           costs + (pp - 1) hops. Fewer running sequences than stages leave lanes empty: those are the
           pipeline's bubbles, so PP adds decode throughput only when there are >= pp micro-batches to run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trt_disagg.errors import UserError
from trt_disagg.planner.memory import read_data_csv

HOP_LATENCY_S = 10e-6  # one point-to-point send between pipeline stages, besides its bytes
NO_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class Coefficients:
    """y = a + b*x1 + c*x2, in seconds."""

    a: float
    b: float
    c: float

    def __call__(self, x1: float, x2: float) -> float:
        return self.a + self.b * x1 + self.c * x2


@dataclass(frozen=True)
class EngineOverheads:
    """Costs of a real engine besides its kernels (seconds); zero for a profiled engine, whose fit holds them."""

    iteration_s: float = 0.0  # every iteration (prefill batch or decode step of one micro-batch)
    per_token_s: float = 0.0  # per context token in the batch (prefill: prompt tokens; decode: tokens in context)
    prefill_stage_s: float = 0.0  # x pp on each of the pp stages a prefill batch crosses (pp = 1: once)
    decode_stage_s: float = 0.0  # per pipeline stage a decode micro-batch step crosses

    def to_dict(self) -> dict:
        return asdict(self)


NO_OVERHEADS = EngineOverheads()
# DistServe's simulator (simdistserve) with its published A100 fits: every iteration 2 ms + 1e-4 ms per context
# token, prefill 1 ms x pp on each of its pp stages (its `pp_const`), decode no stage cost.
DISTSERVE_OVERHEADS = EngineOverheads(iteration_s=2e-3, per_token_s=1e-7, prefill_stage_s=1e-3)


@dataclass(frozen=True)
class PhaseCoefficients:
    """Everything the model needs for one (model, GPU, TP): prefill and the two decode sets."""

    prefill: Coefficients
    decode_small: Coefficients
    decode_large: Coefficients
    decode_threshold: int = NO_THRESHOLD

    def prefill_s(self, sum_len: float, sum_len_sq: float) -> float:
        return self.prefill(sum_len, sum_len_sq)

    def decode_step_s(self, batch: int, sum_ctx: float) -> float:
        coeffs = self.decode_small if batch <= self.decode_threshold else self.decode_large
        return coeffs(sum_ctx, batch)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PhaseCoefficients:
        try:
            return cls(Coefficients(**d["prefill"]), Coefficients(**d["decode_small"]),
                       Coefficients(**d["decode_large"]), int(d.get("decode_threshold", NO_THRESHOLD)))
        except (KeyError, TypeError) as exc:
            raise UserError(f"latency coefficients: missing or bad field {exc}") from None


@dataclass(frozen=True)
class LatencyModel:
    """Coefficients of one model on one GPU type, for each TP degree they exist for."""

    model: str
    gpu: str
    source: str  # published:<engine> | roofline | profile:<file>
    by_tp: dict[int, PhaseCoefficients] = field(default_factory=dict)
    overheads: EngineOverheads = NO_OVERHEADS

    def tps(self) -> list[int]:
        return sorted(self.by_tp)

    def for_tp(self, tp: int) -> PhaseCoefficients:
        if tp not in self.by_tp:
            raise UserError(f"latency model {self.source} for {self.model} on {self.gpu} has no TP {tp} "
                            f"(has {self.tps()})")
        return self.by_tp[tp]

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "gpu": self.gpu, "source": self.source,
                           "by_tp": {str(tp): c.to_dict() for tp, c in self.by_tp.items()},
                           "overheads": self.overheads.to_dict()}, indent=2)

    @classmethod
    def from_json(cls, path: str | Path) -> LatencyModel:
        """A latency-model JSON (`to_json`) or a profile result (which holds one under "latency_model")."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"--coefficients: cannot read {p}: {exc}") from None
        d = d.get("latency_model", d)
        try:
            by_tp = {int(tp): PhaseCoefficients.from_dict(c) for tp, c in d["by_tp"].items()}
            overheads = EngineOverheads(**d.get("overheads", {}))
            return cls(d["model"], d["gpu"], d.get("source", f"profile:{p.name}"), by_tp, overheads)
        except (KeyError, AttributeError, ValueError, TypeError) as exc:
            raise UserError(f"--coefficients: {p} lacks field {exc}") from None


@functools.lru_cache(maxsize=1)
def _published_rows() -> list[dict[str, str]]:
    return read_data_csv("a100_opt_latency_coefficients.csv")


def published_engines(model: str, gpu: str) -> set[str]:
    return {r["engine"] for r in _published_rows() if r["model"] == model and r["gpu"] == gpu}


def published_latency_model(model: str, gpu: str, engine: str = "distserve") -> LatencyModel | None:
    """The DistServe artifact's fits (ms in the file, seconds here), or None when it has no rows for these."""
    sets: dict[int, dict[str, Coefficients]] = {}
    thresholds: dict[int, int] = {}
    for r in _published_rows():
        if (r["engine"], r["model"], r["gpu"]) != (engine, model, gpu):
            continue
        tp = int(r["tp"])
        sets.setdefault(tp, {})[r["phase"]] = Coefficients(float(r["a"]) / 1e3, float(r["b"]) / 1e3,
                                                           float(r["c"]) / 1e3)
        thresholds[tp] = int(r["decode_threshold"])
    if not sets:
        return None
    by_tp = {tp: PhaseCoefficients(s["prefill"], s["decode_small"], s["decode_large"], thresholds[tp])
             for tp, s in sets.items()}
    return LatencyModel(model, gpu, f"published:{engine}", by_tp, DISTSERVE_OVERHEADS)


@dataclass(frozen=True, slots=True)
class DecodeTerms:
    """`InstanceTiming.decode_step_s` flattened: one attribute per number, no method calls, because the
    simulator evaluates it once per decode step of every lane. The engine overheads are folded in (the fixed
    ones into `a_*`, the per-token one into `b_*`).

        step_s = a + b * sum_ctx + c * batch   (small set when batch <= threshold, large set above)
                 + hop_fixed_s + hop_per_seq_s * batch
    """

    threshold: int
    a_small: float
    b_small: float
    c_small: float
    a_large: float
    b_large: float
    c_large: float
    hop_fixed_s: float  # the pp - 1 stage hops' fixed latency
    hop_per_seq_s: float  # the pp - 1 stage hops' activation bytes per sequence over the link


@dataclass(frozen=True)
class InstanceTiming:
    """Times of one instance (tp x pp GPUs): what the simulator asks the latency model."""

    coeffs: PhaseCoefficients
    pp: int
    hidden_size: int
    link_bytes_per_s: float
    dtype_bytes: int = 2
    overheads: EngineOverheads = NO_OVERHEADS

    def _hops_s(self, tokens: float) -> float:
        if self.pp == 1:
            return 0.0
        per_hop = HOP_LATENCY_S + tokens * self.hidden_size * self.dtype_bytes / self.link_bytes_per_s
        return (self.pp - 1) * per_hop

    def iteration_overhead_s(self, context_tokens: float) -> float:
        """What the engine adds to one iteration over `context_tokens` tokens, besides kernels and stages."""
        return self.overheads.iteration_s + self.overheads.per_token_s * context_tokens

    def prefill_s(self, sum_len: float, sum_len_sq: float) -> tuple[float, float]:
        """(stage time: when the next batch may enter, latency: when this batch's first tokens exist)."""
        kernels = self.coeffs.prefill_s(sum_len, sum_len_sq)
        first = self.iteration_overhead_s(sum_len)
        stage_cost = self.pp * self.overheads.prefill_stage_s
        return (kernels / self.pp + first + stage_cost,
                kernels + first + self.pp * stage_cost + self._hops_s(sum_len))

    def decode_terms(self) -> DecodeTerms:
        """The decode step time as flat numbers, for the simulator's hot loop."""
        s, lg, ovh = self.coeffs.decode_small, self.coeffs.decode_large, self.overheads
        fixed = ovh.iteration_s + self.pp * ovh.decode_stage_s
        return DecodeTerms(self.coeffs.decode_threshold, s.a + fixed, s.b + ovh.per_token_s, s.c,
                           lg.a + fixed, lg.b + ovh.per_token_s, lg.c,
                           hop_fixed_s=(self.pp - 1) * HOP_LATENCY_S,
                           hop_per_seq_s=(self.pp - 1) * self.hidden_size * self.dtype_bytes / self.link_bytes_per_s)

    def decode_step_s(self, batch: int, sum_ctx: float) -> float:
        """One decode step of a micro-batch through all stages (a PP instance runs pp micro-batches at once)."""
        return (self.coeffs.decode_step_s(batch, sum_ctx) + self.iteration_overhead_s(sum_ctx)
                + self.pp * self.overheads.decode_stage_s + self._hops_s(batch))
