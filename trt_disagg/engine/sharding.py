"""Split a full Llama state dict into per-rank shards for tensor (TP) and pipeline (PP) parallelism.

The engine's model code depends on this convention exactly:

    rank = pp_rank * tp + tp_rank                      (contract.rank_of, TensorRT-LLM's order)
    names: the HF names with GLOBAL layer indices      model.layers.{i}.self_attn.q_proj.weight
    stage pp_rank holds the layers pp_layer_ranges(num_layers, pp)[pp_rank]
    model.embed_tokens.weight        stage 0 only, full on every TP rank
    model.norm.weight, lm_head.weight  last stage only, full on every TP rank

    column-parallel, dim 0 sliced per rank:  q_proj k_proj v_proj gate_proj up_proj (+ biases)
        -> rank t holds the KV groups and MLP columns of contract.tp_slices(shape, tp)[t]
           (balanced contiguous ranges: equal when tp divides, else sizes differ by one)
    row-parallel, dim 1 sliced the same way:  o_proj down_proj   (their biases, if any, replicated)
    replicated:                                      input_layernorm post_attention_layernorm

Row-parallel outputs are partial sums that the engine all-reduces across the TP group.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch

from trt_disagg.contract import ModelShape, TPSlice, pp_layer_ranges, rank_of, tp_divides_evenly, tp_slices
from trt_disagg.errors import UserError


class Split(enum.Enum):
    """How one tensor is laid out over the TP ranks of a stage."""

    REPLICATED = "replicated"
    COLUMN = "column"  # split dim 0
    ROW = "row"  # split dim 1


class Stage(enum.Enum):
    """Which pipeline stage(s) hold a non-layer tensor."""

    FIRST = "first"
    LAST = "last"


@dataclass(frozen=True)
class Placement:
    split: Split
    layer: int | None  # global layer index, or None for embedding / final norm / lm_head
    stage: Stage | None  # for non-layer tensors


_COLUMN = frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"})
_ROW = frozenset({"self_attn.o_proj", "mlp.down_proj"})
_NORMS = frozenset({"input_layernorm", "post_attention_layernorm"})
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_LEVEL = {
    "model.embed_tokens.weight": Stage.FIRST,
    "model.norm.weight": Stage.LAST,
    "lm_head.weight": Stage.LAST,
}


def placement_of(name: str) -> Placement:
    """Where a tensor goes; an unknown name is refused rather than silently dropped."""
    if name in _TOP_LEVEL:
        return Placement(Split.REPLICATED, None, _TOP_LEVEL[name])
    m = _LAYER_RE.match(name)
    if m:
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if module in _COLUMN:
            return Placement(Split.COLUMN, layer, None)
        if module in _ROW:
            return Placement(Split.ROW if kind == "weight" else Split.REPLICATED, layer, None)
        if module in _NORMS:
            return Placement(Split.REPLICATED, layer, None)
    raise UserError(f"model: tensor {name!r} is not part of a Llama decoder this engine can shard")


def validate_parallelism(shape: ModelShape, tp: int, pp: int, where: str = "", *, even_tp: bool = False) -> None:
    """Refuse a TP/PP the model cannot be split into, naming the config field (`where` is its prefix).

    The CPU engine splits KV groups unevenly when it must (tp <= num_kv_heads); `even_tp` demands what
    TensorRT-LLM demands, that tp divides the heads, the KV heads and the MLP width.
    """
    prefix = f"{where}." if where else ""
    tp_field, pp_field = f"{prefix}tensor_parallel_size", f"{prefix}pipeline_parallel_size"
    if tp < 1:
        raise UserError(f"{tp_field}: must be >= 1, got {tp}")
    if pp < 1:
        raise UserError(f"{pp_field}: must be >= 1, got {pp}")
    if shape.num_heads % shape.num_kv_heads:
        raise UserError(f"model: num_heads ({shape.num_heads}) is not a multiple of num_kv_heads ({shape.num_kv_heads})")
    if tp > shape.num_kv_heads:
        raise UserError(f"{tp_field}: {tp} is more than the model's {shape.num_kv_heads} KV heads "
                        "(a rank would hold no KV head)")
    if even_tp and not tp_divides_evenly(shape, tp):
        raise UserError(f"{tp_field}: {tp} does not divide the model's KV heads ({shape.num_kv_heads}), "
                        f"heads ({shape.num_heads}) and MLP width ({shape.intermediate_size}); "
                        "TensorRT-LLM needs equal splits")
    if pp > shape.num_layers:
        raise UserError(f"{pp_field}: {pp} is more than the model's {shape.num_layers} layers")


def _tp_pieces(name: str, tensor: torch.Tensor, dim: int, slices: list[TPSlice], head_dim: int) -> list[torch.Tensor]:
    """The slice of `tensor` along `dim` that each TP rank holds."""
    if "k_proj" in name or "v_proj" in name:
        ranges = [range(s.kv_heads.start * head_dim, s.kv_heads.stop * head_dim) for s in slices]
    elif "q_proj" in name or "o_proj" in name:
        ranges = [range(s.q_heads.start * head_dim, s.q_heads.stop * head_dim) for s in slices]
    else:
        ranges = [s.mlp_columns for s in slices]
    return [tensor.narrow(dim, r.start, len(r)).contiguous().clone() for r in ranges]


def _stage_of_layer(layer: int, ranges: list[range]) -> int:
    for stage, r in enumerate(ranges):
        if layer in r:
            return stage
    raise UserError(f"model: layer {layer} is outside the model's {ranges[-1].stop} layers")


def shard_state_dict(state_dict: dict[str, torch.Tensor], shape: ModelShape, tp: int,
                     pp: int) -> dict[int, dict[str, torch.Tensor]]:
    """rank -> that rank's tensors. Split tensors are contiguous copies; replicated ones are shared."""
    validate_parallelism(shape, tp, pp)
    ranges = pp_layer_ranges(shape.num_layers, pp)
    slices = tp_slices(shape, tp)
    shards: dict[int, dict[str, torch.Tensor]] = {rank_of(t, s, tp): {} for s in range(pp) for t in range(tp)}
    for name, tensor in state_dict.items():
        where = placement_of(name)
        if where.layer is not None:
            stages = [_stage_of_layer(where.layer, ranges)]
        else:
            stages = [0] if where.stage is Stage.FIRST else [pp - 1]
        if where.split is Split.REPLICATED:
            pieces = [tensor] * tp
        else:
            dim = 0 if where.split is Split.COLUMN else 1
            pieces = _tp_pieces(name, tensor, dim, slices, shape.head_dim)
        for stage in stages:
            for t in range(tp):
                shards[rank_of(t, stage, tp)][name] = pieces[t]
    return shards
