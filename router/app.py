"""The router application: `create_app(settings)` builds it, its lifespan opens and closes everything.

    lifespan start: Redis client → settle this router's unfinished requests from a previous run →
                    first instance refresh → background task (every refresh_interval_s: instances, loads,
                    shared load, gauges; reap requests past their deadline)
    lifespan stop:  cancel background tasks (kept in a set) → withdraw shared load → close instance
                    clients and Redis

Nothing is created at import; tests pass their own InstanceClient and tokenizer and a Redis URL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from router.deps import RouterState
from router.dispatch import Dispatcher, make_policy
from router.errors import install_handlers
from router.instance_client import InstanceClient, TritonInstanceClient
from router.kv_release import KVReleaser, SocketKVReleaser
from router.metrics import RouterMetrics
from router.pipeline import RequestRunner
from router.records import RecordStore
from router.routes import include_all
from router.settings import RouterSettings
from router.tokenizer import HFTokenizer, TextTokenizer
from trt_disagg.errors import UserError

log = logging.getLogger(__name__)


def create_app(settings: RouterSettings, *, instance_client: InstanceClient | None = None,
               tokenizer: TextTokenizer | None = None, kv_releaser: KVReleaser | None = None) -> FastAPI:
    """The router for `settings`; `instance_client`/`tokenizer`/`kv_releaser` replace the Triton client, the
    engine's tokenizer and the release of un-pulled KV over the instances' KV endpoints."""
    policy = make_policy(settings.policy)  # a bad name fails here, not at the first request
    if tokenizer is None and settings.engine_dir is None:
        raise UserError("the router needs engine_dir (for the tokenizer) or an explicit tokenizer")
    state = RouterState(settings=settings, metrics=RouterMetrics(), tokenizer=tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.tokenizer is None:
            assert settings.engine_dir is not None
            state.tokenizer = await asyncio.to_thread(HFTokenizer.from_engine_dir, settings.engine_dir)
        state.client = instance_client or TritonInstanceClient(prefill_timeout_s=settings.prefill_timeout_s)
        state.redis = aioredis.from_url(settings.redis_url, decode_responses=False)
        try:
            state.records = RecordStore(state.redis, settings.router_id, retention_s=settings.retention_s,
                                        live_ttl_s=settings.request_timeout_s, handle_ttl_s=settings.handle_ttl_s)
            await state.records.settle_orphans("router restarted while the request was in flight")
            state.dispatcher = Dispatcher(state.redis, settings.router_id, policy,
                                          colocated_threshold_tokens=settings.colocated_threshold_tokens,
                                          max_queued_prompt_tokens=settings.max_queued_prompt_tokens,
                                          publish_ttl_s=max(3 * settings.refresh_interval_s, 1.0))
            state.metrics.observe_snapshot(await state.dispatcher.refresh())
            releaser = kv_releaser or SocketKVReleaser(timeout_s=settings.kv_release_timeout_s)
            state.runner = RequestRunner(settings, state.records, state.dispatcher, state.client, releaser,
                                         state.metrics, state.spawn)
            state.spawn(_refresh_loop(state))
            log.info("router %s up on %s:%d (policy %s)", settings.router_id, settings.host, settings.port,
                     settings.policy)
            yield
        finally:
            for task in list(state.tasks):
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            if state.dispatcher is not None:
                try:
                    await state.dispatcher.withdraw()
                except Exception:
                    log.info("could not withdraw shared load (Redis gone?)", exc_info=True)
            await state.client.close()
            await state.redis.aclose()

    app = FastAPI(title="trt-disagg router", lifespan=lifespan)
    app.state.router = state
    install_handlers(app)
    include_all(app)
    return app


async def _refresh_loop(state: RouterState) -> None:
    """Keep the instance view and the shared load fresh; a Redis hiccup is logged, not fatal."""
    assert state.dispatcher is not None
    while True:
        await asyncio.sleep(state.settings.refresh_interval_s)
        try:
            state.metrics.observe_snapshot(await state.dispatcher.refresh())
            if state.runner is not None:
                await state.runner.reap_overdue()
        except Exception:
            log.warning("instance refresh or reaping failed", exc_info=True)
