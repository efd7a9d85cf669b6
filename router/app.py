"""The router application: `create_app(settings)` builds it, its lifespan opens and closes everything.

    lifespan start: Redis client → settle this router's unfinished requests from a previous run →
                    first instance refresh → background task (every refresh_interval_s: instances, loads,
                    shared load, gauges; reap requests past their deadline)
    lifespan stop:  cancel background tasks (kept in a set) → withdraw shared load → close instance
                    clients and Redis; each step bounded by shutdown_timeout_s (an overrun is logged,
                    with the stuck task's stack: the router exits either way)

Nothing is created at import; tests pass their own InstanceClient and tokenizer and a Redis URL.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI

from router import kv_routing
from router.deps import RouterState
from router.dispatch import Dispatcher, make_policy
from router.errors import install_handlers
from router.instance_client import InstanceClient, TritonInstanceClient
from router.kv_release import KVReleaser, SocketKVReleaser
from router.limits import RequestBodyLimit
from router.metrics import RouterMetrics
from router.openapi import install_openapi
from router.pipeline import RequestRunner
from router.received import StampReceived
from router.records import RecordStore
from router.request_table import RequestTable
from router.routes import include_all
from router.settings import RouterSettings
from router.tokenizer import HFTokenizer, TextTokenizer
from trt_disagg.errors import UserError

log = logging.getLogger(__name__)


def create_app(settings: RouterSettings, *, instance_client: InstanceClient | None = None,
               tokenizer: TextTokenizer | None = None, kv_releaser: KVReleaser | None = None) -> FastAPI:
    """The router for `settings`; `instance_client`/`tokenizer`/`kv_releaser` replace the Triton client, the
    engine's tokenizer and the release of un-pulled KV over the instances' KV endpoints."""
    policy = make_policy(settings.policy, **kv_routing.policy_options(settings))  # a bad name fails here
    if tokenizer is None and settings.engine_dir is None:
        raise UserError("the router needs engine_dir (for the tokenizer) or an explicit tokenizer")
    state = RouterState(settings=settings, metrics=RouterMetrics(), tokenizer=tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.tokenizer is None:
            assert settings.engine_dir is not None
            state.tokenizer = await asyncio.to_thread(HFTokenizer.from_engine_dir, settings.engine_dir)
        state.client = instance_client or TritonInstanceClient(prefill_timeout_s=settings.prefill_timeout_s)
        # bounded socket waits: a partitioned Redis must fail a command, not hang the refresh loop forever
        state.redis = aioredis.from_url(settings.redis_url, decode_responses=False, socket_connect_timeout=2.0,
                                        socket_timeout=5.0)
        try:
            state.records = RecordStore(state.redis, settings.router_id, retention_s=settings.retention_s,
                                        live_ttl_s=settings.request_timeout_s, handle_ttl_s=settings.handle_ttl_s)
            await state.records.settle_orphans("router restarted while the request was in flight")
            state.dispatcher = Dispatcher(state.redis, settings.router_id, policy,
                                          colocated_threshold_tokens=settings.colocated_threshold_tokens,
                                          max_queued_prompt_tokens=settings.max_queued_prompt_tokens,
                                          publish_ttl_s=max(3 * settings.refresh_interval_s, 1.0))
            state.metrics.observe_snapshot(await state.dispatcher.refresh())
            kv_routing.attach(state.dispatcher, state.redis, settings, state.metrics, state.spawn, state.stopping)
            releaser = kv_releaser or SocketKVReleaser(timeout_s=settings.kv_release_timeout_s)
            requests = RequestTable(settings, state.records, state.client, releaser, state.metrics, state.spawn)
            state.runner = RequestRunner(settings, requests, state.dispatcher, state.client, state.metrics)
            state.spawn(_refresh_loop(state))
            log.info("router %s up on %s:%d (policy %s)", settings.router_id, settings.host, settings.port,
                     settings.policy)
            yield
        finally:
            state.stopping.set()
            await _stop_tasks(state.tasks, settings.shutdown_timeout_s)
            if state.dispatcher is not None:
                await _bounded(state.dispatcher.withdraw(), settings.shutdown_timeout_s,
                               "withdrawing this router's shared load")
            await _bounded(state.client.close(), settings.shutdown_timeout_s, "closing the instance channels")
            await _bounded(state.redis.aclose(), settings.shutdown_timeout_s, "closing the Redis client")

    app = FastAPI(title="trt-disagg router", lifespan=lifespan)
    app.add_middleware(RequestBodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(StampReceived, accept_queue=state.accept_queue)  # added last: outermost, runs first
    app.state.router = state
    install_handlers(app)
    install_openapi(app, settings)
    include_all(app)
    return app


async def _stop_tasks(tasks: set[asyncio.Task[None]], timeout_s: float) -> None:
    """Cancel the background tasks and wait for them, at most `timeout_s`: a router asked to stop must stop.
    A task still running then is logged with its stack (it ignored its cancellation: a bug to see)."""
    pending = set(tasks)
    for task in pending:
        task.cancel()
    if not pending:
        return
    _, stuck = await asyncio.wait(pending, timeout=timeout_s)
    for task in stuck:
        stack = io.StringIO()
        task.print_stack(file=stack)
        log.warning("background task %s still running %.1fs after its cancellation:\n%s", task.get_name(),
                    timeout_s, stack.getvalue())


async def _bounded(step: Coroutine[Any, Any, Any], timeout_s: float, what: str) -> None:
    """One shutdown step, at most `timeout_s`; a failure or an overrun is logged, and shutdown goes on."""
    try:
        async with asyncio.timeout(timeout_s):
            await step
    except TimeoutError:
        log.warning("shutdown: %s took longer than %.1fs; going on", what, timeout_s)
    except Exception:
        log.info("shutdown: %s failed (Redis or an instance gone?)", what, exc_info=True)


async def _refresh_loop(state: RouterState) -> None:
    """Keep the instance view and the shared load fresh; a Redis hiccup is logged, not fatal.

    It ends when `state.stopping` is set, not only when cancelled: redis-py 8.1 can swallow a task's
    cancellation that arrives during a command (the command returns normally), and a loop that relied on
    the cancel alone would then run forever and hold up the router's shutdown."""
    assert state.dispatcher is not None
    while not state.stopping.is_set():
        await asyncio.sleep(state.settings.refresh_interval_s)
        try:
            state.metrics.observe_snapshot(await state.dispatcher.refresh())
            redis_ok = True
        except Exception:
            redis_ok = False
            log.warning("instance refresh failed (Redis unreachable?)", exc_info=True)
        if state.runner is None:
            continue
        state.runner.requests.records_available(redis_ok)
        if not redis_ok:
            continue
        for instance_id in state.dispatcher.lost_instances(state.settings.instance_lost_after_s):
            moved = state.runner.requests.abandon_legs_on(instance_id)
            if moved:
                log.warning("instance %s left the registry; moving %d request(s) elsewhere", instance_id, len(moved))
        try:
            await state.runner.requests.reap_overdue()
        except Exception:
            log.warning("reaping overdue requests failed", exc_info=True)
