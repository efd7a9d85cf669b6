"""Sharding convention: every tensor lands on exactly the right ranks, and the shards put back together
are the original tensors (TP1, TP2, PP2, TP2xPP2, and an uneven PP split)."""

from __future__ import annotations

import pytest
import torch

from trt_disagg.contract import ModelShape, pp_layer_ranges, rank_of
from trt_disagg.engine.sharding import Split, placement_of, shard_state_dict, validate_parallelism
from trt_disagg.errors import UserError

SHAPE = ModelShape(num_layers=5, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, vocab_size=50)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (1, 5), (2, 3)]


def make_state(shape: ModelShape, bias: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim

    def rnd(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=g)

    sd = {"model.embed_tokens.weight": rnd(shape.vocab_size, h), "model.norm.weight": rnd(h),
          "lm_head.weight": rnd(shape.vocab_size, h)}
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        sd[p + "self_attn.q_proj.weight"] = rnd(shape.num_heads * d, h)
        sd[p + "self_attn.k_proj.weight"] = rnd(shape.num_kv_heads * d, h)
        sd[p + "self_attn.v_proj.weight"] = rnd(shape.num_kv_heads * d, h)
        sd[p + "self_attn.o_proj.weight"] = rnd(h, shape.num_heads * d)
        sd[p + "mlp.gate_proj.weight"] = rnd(i, h)
        sd[p + "mlp.up_proj.weight"] = rnd(i, h)
        sd[p + "mlp.down_proj.weight"] = rnd(h, i)
        sd[p + "input_layernorm.weight"] = rnd(h)
        sd[p + "post_attention_layernorm.weight"] = rnd(h)
        if bias:
            sd[p + "self_attn.q_proj.bias"] = rnd(shape.num_heads * d)
            sd[p + "self_attn.k_proj.bias"] = rnd(shape.num_kv_heads * d)
            sd[p + "self_attn.v_proj.bias"] = rnd(shape.num_kv_heads * d)
            sd[p + "self_attn.o_proj.bias"] = rnd(h)
    return sd


def expected_stage(name: str, pp: int) -> int:
    if name == "model.embed_tokens.weight":
        return 0
    if name in ("model.norm.weight", "lm_head.weight"):
        return pp - 1
    layer = int(name.split(".")[2])
    return next(s for s, r in enumerate(pp_layer_ranges(SHAPE.num_layers, pp)) if layer in r)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_shards_reassemble_to_the_original(tp: int, pp: int) -> None:
    sd = make_state(SHAPE, bias=True)
    shards = shard_state_dict(sd, SHAPE, tp, pp)
    assert sorted(shards) == list(range(tp * pp))
    for name, full in sd.items():
        stage = expected_stage(name, pp)
        pieces = [shards[rank_of(t, stage, tp)][name] for t in range(tp)]
        split = placement_of(name).split
        if split is Split.COLUMN:
            rebuilt = torch.cat(pieces, dim=0)
        elif split is Split.ROW:
            rebuilt = torch.cat(pieces, dim=1)
        else:
            assert all(torch.equal(p, full) for p in pieces)
            rebuilt = pieces[0]
        assert torch.equal(rebuilt, full), name


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_every_tensor_is_on_exactly_the_right_ranks(tp: int, pp: int) -> None:
    sd = make_state(SHAPE)
    shards = shard_state_dict(sd, SHAPE, tp, pp)
    for name in sd:
        holders = {rank for rank, tensors in shards.items() if name in tensors}
        stage = expected_stage(name, pp)
        assert holders == {rank_of(t, stage, tp) for t in range(tp)}, name
    # each stage holds only its own layers, with global indices
    for stage, layers in enumerate(pp_layer_ranges(SHAPE.num_layers, pp)):
        names = shards[rank_of(0, stage, tp)]
        held = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert held == set(layers)
        assert ("model.embed_tokens.weight" in names) == (stage == 0)
        assert ("lm_head.weight" in names) == (stage == pp - 1)
        assert ("model.norm.weight" in names) == (stage == pp - 1)


def test_tp_rank_holds_whole_heads_in_order() -> None:
    sd = make_state(SHAPE)
    shards = shard_state_dict(sd, SHAPE, tp=2, pp=1)
    d = SHAPE.head_dim
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    k = sd["model.layers.0.self_attn.k_proj.weight"]
    o = sd["model.layers.0.self_attn.o_proj.weight"]
    # rank 1 holds q heads 2..3 and kv head 1, and the matching input columns of o_proj
    assert torch.equal(shards[1]["model.layers.0.self_attn.q_proj.weight"], q[2 * d:4 * d])
    assert torch.equal(shards[1]["model.layers.0.self_attn.k_proj.weight"], k[1 * d:2 * d])
    assert torch.equal(shards[1]["model.layers.0.self_attn.o_proj.weight"], o[:, 2 * d:4 * d])
    assert shards[1]["model.layers.0.self_attn.q_proj.weight"].is_contiguous()
    assert shards[1]["model.layers.0.self_attn.o_proj.weight"].is_contiguous()


def test_biases_follow_their_weights() -> None:
    assert placement_of("model.layers.3.self_attn.q_proj.bias").split is Split.COLUMN
    assert placement_of("model.layers.3.self_attn.o_proj.bias").split is Split.REPLICATED
    assert placement_of("model.layers.3.mlp.down_proj.weight").split is Split.ROW
    assert placement_of("model.layers.3.input_layernorm.weight").split is Split.REPLICATED


def test_unknown_tensor_is_refused() -> None:
    sd = make_state(SHAPE)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    with pytest.raises(UserError, match="rotary_emb.inv_freq"):
        shard_state_dict(sd, SHAPE, 1, 1)


@pytest.mark.parametrize("tp,pp,field,what", [
    (3, 1, "tensor_parallel_size", "2 KV heads"),
    (4, 1, "tensor_parallel_size", "2 KV heads"),
    (1, 6, "pipeline_parallel_size", "5 layers"),
    (0, 1, "tensor_parallel_size", ">= 1"),
    (1, 0, "pipeline_parallel_size", ">= 1"),
])
def test_validate_parallelism_names_the_field(tp: int, pp: int, field: str, what: str) -> None:
    with pytest.raises(UserError) as exc:
        validate_parallelism(SHAPE, tp, pp, where="context_servers")
    assert f"context_servers.{field}" in str(exc.value)
    assert what in str(exc.value)


def test_uneven_tp_is_cpu_only() -> None:
    """SmolLM2-135M has 3 KV heads: the CPU engine runs it at TP2 (KV groups 2 + 1); TensorRT-LLM cannot."""
    shape = ModelShape(num_layers=2, hidden_size=36, intermediate_size=66, num_heads=9, num_kv_heads=3,
                       vocab_size=10)
    validate_parallelism(shape, 2, 1)
    with pytest.raises(UserError, match="does not divide the model's KV heads"):
        validate_parallelism(shape, 2, 1, even_tp=True)
    validate_parallelism(shape, 3, 1, even_tp=True)


def test_uneven_tp_shards_put_back_together() -> None:
    shape = ModelShape(num_layers=2, hidden_size=36, intermediate_size=66, num_heads=9, num_kv_heads=3,
                       vocab_size=10)
    sd = make_state(shape)
    shards = shard_state_dict(sd, shape, 2, 1)
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert [shards[r][k].shape[0] for r in (0, 1)] == [2 * shape.head_dim, 1 * shape.head_dim]
    assert [shards[r][q].shape[0] for r in (0, 1)] == [6 * shape.head_dim, 3 * shape.head_dim]
    assert torch.equal(torch.cat([shards[0][q], shards[1][q]]), sd[q])
    assert torch.equal(torch.cat([shards[0][o], shards[1][o]], dim=1), sd[o])
