"""Reading the instance registry from Redis (redis.asyncio): who serves what, and how loaded it is.

The router discovers instances through these; tools and tests use them too. They live apart from the
instance side's writer (`triton.registry.Registrar`) because that package runs the engine: this module
needs only the key names and the JSON codecs of the contract, so a reader never loads torch.
"""

from __future__ import annotations

from typing import Any

from trt_disagg.contract import InstanceInfo, InstanceLoad, Role, decode_info, decode_load
from trt_disagg.keys import as_text, instance_key, load_key, role_set_key

# KEYS: role set, instance key. ARGV: instance id. Prunes the member only if its instance key is still
# missing: a heartbeat that re-registered it between our read and this prune must not be undone.
_PRUNE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.call('SREM', KEYS[1], ARGV[1]) end
return 0
"""


async def list_instances(redis: Any, role: Role | str) -> list[InstanceInfo]:
    """Live instances of `role`, sorted by id; members whose heartbeat expired are pruned (an instance that
    beats again re-adds itself: see triton.registry)."""
    ids = sorted(as_text(m) for m in await redis.smembers(role_set_key(role)))
    if not ids:
        return []
    raws = await redis.mget([instance_key(i) for i in ids])
    out: list[InstanceInfo] = []
    for instance_id, raw in zip(ids, raws, strict=True):
        if raw is None:
            await redis.eval(_PRUNE_LUA, 2, role_set_key(role), instance_key(instance_id), instance_id)
            continue
        out.append(decode_info(raw))
    return out


async def get_instance(redis: Any, instance_id: str) -> InstanceInfo | None:
    raw = await redis.get(instance_key(instance_id))
    return None if raw is None else decode_info(raw)


async def get_load(redis: Any, instance_id: str) -> InstanceLoad | None:
    """The load an instance last published, or None when it is gone (or never published)."""
    raw = await redis.get(load_key(instance_id))
    return None if raw is None else decode_load(raw)
