from __future__ import annotations

import pytest
import torch

from trt_disagg.contract import KVLayout
from trt_disagg.engine.kv_layout import assemble_full, convert, slice_for
from trt_disagg.exported_kv import ExportedKV

LAYERS, HEADS, DIM, TOKENS = 5, 4, 3, 7  # 5 layers: PP splits unevenly (3 + 2)


def layout(tp: int, pp: int, fingerprint: str = "f") -> KVLayout:
    return KVLayout(fingerprint, LAYERS, HEADS, DIM, "float32", 16, tp, pp)


@pytest.mark.parametrize("src", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("dst", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_any_layout_converts_to_any_other_exactly(src, dst) -> None:
    full = torch.randn(LAYERS, 2, TOKENS, HEADS, DIM)
    exported = ExportedKV(layout(*src), TOKENS, slice_for(full, layout(*src)))
    assert torch.equal(assemble_full(exported), full)
    shards = convert(exported, layout(*dst))
    expected = slice_for(full, layout(*dst))
    assert shards.keys() == expected.keys()
    for rank in expected:
        assert torch.equal(shards[rank], expected[rank])


def test_tp2_pp1_shards_split_heads_and_pp2_splits_layers() -> None:
    full = torch.randn(LAYERS, 2, TOKENS, HEADS, DIM)
    tp2 = slice_for(full, layout(2, 1))
    assert tp2[0].shape == (LAYERS, 2, TOKENS, 2, DIM)
    pp2 = slice_for(full, layout(1, 2))
    assert [pp2[0].shape[0], pp2[1].shape[0]] == [3, 2]


def test_other_model_is_refused() -> None:
    full = torch.randn(LAYERS, 2, TOKENS, HEADS, DIM)
    exported = ExportedKV(layout(1, 1, "model-a"), TOKENS, slice_for(full, layout(1, 1)))
    with pytest.raises(ValueError, match="fingerprint"):
        convert(exported, layout(1, 1, "model-b"))
