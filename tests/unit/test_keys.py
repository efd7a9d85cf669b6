"""The Redis key schema: every key is under the prefix, and no two kinds of key can collide."""

from __future__ import annotations

from trt_disagg import keys
from trt_disagg.contract import Role


def test_every_key_is_prefixed_and_distinct_for_the_same_id():
    per_id = [keys.instance_key, keys.load_key, keys.record_key, keys.events_key, keys.handle_key,
              keys.active_key, keys.drain_key, keys.router_inflight_key]
    names = {f("x") for f in per_id} | {keys.role_set_key(r) for r in Role} | {keys.KV_SECRET_KEY, keys.ROUTERS_KEY}
    assert len(names) == len(per_id) + len(Role) + 2
    assert all(n.startswith(keys.KEY_PREFIX) for n in names)


def test_as_text_takes_either_reply_type():
    assert keys.as_text(b"ok") == "ok" == keys.as_text("ok")
