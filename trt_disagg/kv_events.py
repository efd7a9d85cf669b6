"""Prefix blocks and the KV cache events instances publish about them: what the engine, the instance and the
router must agree on bit for bit, in one torch-free module.

Block identity (TensorRT-LLM's block reuse): a *full* block of `tokens_per_block` prompt or generated tokens
is named by a hash chain,

    h_0 = H(salt || 0 || tokens of block 0)
    h_i = H(salt || h_{i-1} || tokens of block i)

so a block's hash names its whole prefix: two sequences share block i exactly when they share tokens
0 .. (i+1)·tokens_per_block − 1. A partial last block has no hash (it is never shared). `salt` names the
model (same weights and tokenizer → same salt), so caches of different models never match. H is
BLAKE2b with an 8-byte digest, read as an unsigned 64-bit int: small in JSON, collisions negligible at
any cache size an instance holds.

Events (TensorRT-LLM's KV cache event kinds): an instance appends each change of its reusable set to one
Redis stream per deployment (`trt_disagg.keys.kv_events_key()`), as JSON in field `e`:

    {"instance": id, "seq": n, "kind": "stored",  "blocks": [h, ...], "parent": h | null, "tokens_per_block": B}
    {"instance": id, "seq": n, "kind": "removed", "blocks": [h, ...]}
    {"instance": id, "seq": n, "kind": "cleared"}                         (the instance (re)started empty)

`epoch` names one run of an instance (its start time in ms; a restart under the same id starts a higher
epoch at seq 1, so a reader never mistakes the new run's events for old ones). `seq` counts a run's events from 1; a reader that sees a gap (events trimmed from the bounded
stream) rebuilds that instance from its snapshot (`kv_snapshot_key(id)`: the same "stored" shape holding
every cached hash, with the `seq` it is current to).
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_ROOT = (0).to_bytes(8, "little")


def block_hashes(token_ids: Sequence[int], tokens_per_block: int, salt: bytes,
                 parent: int | None = None) -> list[int]:
    """The hash of every full block of `token_ids`, in order (a partial tail block is left out).

    `parent` continues a chain: the hashes of blocks that follow the block whose hash is `parent`."""
    if tokens_per_block <= 0:
        raise ValueError(f"tokens_per_block must be > 0, got {tokens_per_block}")
    out: list[int] = []
    prev = _ROOT if parent is None else parent.to_bytes(8, "little")
    full = len(token_ids) - len(token_ids) % tokens_per_block
    pack = struct.Struct(f"<{tokens_per_block}i").pack
    for start in range(0, full, tokens_per_block):
        digest = hashlib.blake2b(salt + prev + pack(*token_ids[start:start + tokens_per_block]),
                                 digest_size=8).digest()
        out.append(int.from_bytes(digest, "little"))
        prev = digest
    return out


class KVEventKind(enum.StrEnum):
    STORED = "stored"  # blocks became reusable (their request ended, or they were imported / generated)
    REMOVED = "removed"  # blocks were evicted (or reused for other tokens): no longer reusable
    CLEARED = "cleared"  # the instance holds no reusable block (a fresh start)


@dataclass(frozen=True)
class KVEvent:
    instance_id: str
    seq: int  # per instance, from 1, no gaps: a gap means events were lost (rebuild from the snapshot)
    kind: KVEventKind
    blocks: tuple[int, ...] = ()  # stored: in chain order; removed: any order
    parent: int | None = None  # stored: the hash before blocks[0] (None: blocks[0] starts a sequence)
    tokens_per_block: int = 0  # stored only
    extra: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # the instance's run (start time, ms): a higher epoch supersedes every earlier event

    def to_json(self) -> str:
        body: dict[str, Any] = {"instance": self.instance_id, "seq": self.seq, "kind": self.kind.value}
        if self.epoch:
            body["epoch"] = self.epoch
        if self.kind is KVEventKind.STORED:
            body.update(blocks=list(self.blocks), parent=self.parent, tokens_per_block=self.tokens_per_block)
        elif self.kind is KVEventKind.REMOVED:
            body["blocks"] = list(self.blocks)
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> KVEvent:
        """Parse one event; raises ValueError on anything malformed (a reader counts and skips those)."""
        try:
            d = json.loads(raw)
            kind = KVEventKind(d["kind"])
            instance, seq = d["instance"], d["seq"]
            if not isinstance(instance, str) or not instance or not isinstance(seq, int) or seq < 1:
                raise ValueError("instance must be a non-empty string and seq an int >= 1")
            blocks = tuple(d.get("blocks", ()))
            if not all(isinstance(b, int) and 0 <= b < 1 << 64 for b in blocks):
                raise ValueError("block hashes must be unsigned 64-bit ints")
            parent = d.get("parent")
            if parent is not None and not (isinstance(parent, int) and 0 <= parent < 1 << 64):
                raise ValueError("parent must be an unsigned 64-bit int or null")
            epoch = d.get("epoch", 0)
            if not isinstance(epoch, int) or epoch < 0:
                raise ValueError("epoch must be an int >= 0")
            tpb = d.get("tokens_per_block", 0)
            if kind is KVEventKind.STORED and not (isinstance(tpb, int) and tpb > 0):
                raise ValueError("a stored event needs tokens_per_block > 0")
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed KV event: {exc}") from None
        return cls(instance, seq, kind, blocks, parent, tpb, epoch=epoch)
