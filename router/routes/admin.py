"""/admin/instances: list, drain (no new work; running requests finish) and remove instances.

Behind `Authorization: Bearer <admin_token>`. Drain marks live in Redis (`trtd:drain:<id>`), so every
router sharing the Redis stops dispatching to a drained instance at its next refresh. Remove takes the
instance out of its role set, deletes its registration and leaves a removal mark (`trtd:removed:<id>`)
that its heartbeat respects: a running instance only comes back when it restarts and registers again.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from router.deps import get_dispatcher, get_redis, require_admin
from router.dispatch import Dispatcher
from router.errors import NotFound
from trt_disagg.keys import drain_key, instance_key, load_key, removed_key, role_set_key

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)],
                   responses={401: {"description": "missing or wrong bearer token"}})


@router.get("/instances")
async def list_all(dispatcher: Dispatcher = Depends(get_dispatcher)) -> dict[str, Any]:
    snap = await dispatcher.refresh()
    out = []
    for role, views in snap.instances.items():
        for v in views:
            o = dispatcher.outstanding(v.info.instance_id)
            out.append({"id": v.info.instance_id, "role": role.value, "grpc_url": v.info.grpc_url,
                        "draining": v.draining, "tp": v.info.tp, "pp": v.info.pp,
                        "load": vars(v.load), "outstanding": vars(o)})
    return {"instances": out}


async def _find(dispatcher: Dispatcher, instance_id: str) -> Any:
    await dispatcher.refresh()
    view = dispatcher.instance(instance_id)
    if view is None:
        raise NotFound(f"instance {instance_id!r} is not registered", param="instance_id")
    return view


@router.post("/instances/{instance_id}/drain")
async def drain(instance_id: str, dispatcher: Dispatcher = Depends(get_dispatcher),
                redis: Any = Depends(get_redis)) -> dict[str, Any]:
    await _find(dispatcher, instance_id)
    await redis.set(drain_key(instance_id), "1")
    await dispatcher.refresh()
    return {"id": instance_id, "draining": True}


@router.post("/instances/{instance_id}/undrain")
async def undrain(instance_id: str, dispatcher: Dispatcher = Depends(get_dispatcher),
                  redis: Any = Depends(get_redis)) -> dict[str, Any]:
    await _find(dispatcher, instance_id)
    await redis.delete(drain_key(instance_id))
    await dispatcher.refresh()
    return {"id": instance_id, "draining": False}


@router.delete("/instances/{instance_id}")
async def remove(instance_id: str, dispatcher: Dispatcher = Depends(get_dispatcher),
                 redis: Any = Depends(get_redis)) -> dict[str, Any]:
    view = await _find(dispatcher, instance_id)
    pipe = redis.pipeline(transaction=True)
    pipe.set(removed_key(instance_id), "1")  # heartbeats re-register everything else; this they respect
    pipe.srem(role_set_key(view.info.role), instance_id)
    pipe.delete(instance_key(instance_id), load_key(instance_id), drain_key(instance_id))
    await pipe.execute()
    await dispatcher.refresh()
    return {"id": instance_id, "removed": True}
