"""Prefix block hashes and KV cache events: the format the engine, the instances and the router share."""

from __future__ import annotations

import pytest

from trt_disagg.kv_events import KVEvent, KVEventKind, block_hashes


def test_a_block_hash_names_its_whole_prefix():
    a = block_hashes(list(range(40)), 16, b"m")
    assert len(a) == 2  # the partial third block has no hash
    assert block_hashes(list(range(32)) + [7] * 5, 16, b"m") == a  # same first 32 tokens, same blocks
    changed = block_hashes([99] + list(range(1, 40)), 16, b"m")
    assert changed[0] != a[0] and changed[1] != a[1]  # a change in block 0 renames every later block
    assert block_hashes(list(range(40)), 16, b"other model") != a
    assert block_hashes(list(range(16, 32)), 16, b"m", parent=a[0]) == a[1:]  # a chain continues
    with pytest.raises(ValueError):
        block_hashes([1], 0, b"m")


def test_events_round_trip_and_malformed_ones_are_refused():
    stored = KVEvent("decode-0", 3, KVEventKind.STORED, (1, 2), parent=None, tokens_per_block=16)
    assert KVEvent.from_json(stored.to_json()) == stored
    removed = KVEvent("decode-0", 4, KVEventKind.REMOVED, (2,))
    assert KVEvent.from_json(removed.to_json()) == removed
    for bad in ("{", "[]", '{"kind": "stored"}', '{"instance": "x", "seq": 0, "kind": "cleared"}',
                '{"instance": "x", "seq": 1, "kind": "stored", "blocks": [-1], "tokens_per_block": 16}',
                '{"instance": "x", "seq": 1, "kind": "stored", "blocks": [1]}',
                '{"instance": "x", "seq": 1, "kind": "evicted"}'):
        with pytest.raises(ValueError):
            KVEvent.from_json(bad)
