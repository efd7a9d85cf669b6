"""A request's bookkeeping on the router: admission, its Redis record, settling, the outcome's metrics.

`RequestRunner` (pipeline.py) extends `RequestLifecycle` with the token path; this half owns the
`active` table and the record: the first write goes out with the first instance call (`_begin`), every
later write waits for it (`_flush`), and `_settle` writes the terminal state exactly once (the reaper and
the generator may both try) and releases whatever the request's legs still hold: open calls, and prefill
KV that no decode instance pulled (kv_release.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from router.dispatch import Dispatcher, ServePath
from router.errors import Overloaded
from router.instance_client import InstanceClient
from router.job import Job
from router.kv_release import KVReleaser
from router.metrics import RouterMetrics
from router.records import RecordStore, Step
from router.settings import RouterSettings
from router.states import ALLOWED, TERMINAL, RequestState
from trt_disagg.contract import SamplingParams

log = logging.getLogger(__name__)

S = RequestState


Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class RequestLifecycle:
    """Bookkeeping of the requests this router holds: admission, record writes, settling, outcome metrics."""

    def __init__(self, settings: RouterSettings, records: RecordStore, dispatcher: Dispatcher,
                 client: InstanceClient, releaser: KVReleaser, metrics: RouterMetrics, spawn: Spawn) -> None:
        self._settings = settings
        self._records = records
        self._dispatch = dispatcher
        self._client = client
        self._releaser = releaser
        self._metrics = metrics
        self._spawn = spawn
        self.active: dict[str, Job] = {}
        self._settled: dict[str, asyncio.Event] = {}

    async def admit(self, prompt_ids: list[int], sampling: SamplingParams, model: str) -> Job:
        if len(self.active) >= self._settings.max_queued_requests:
            self._metrics.errors.labels(kind="overloaded").inc()
            raise Overloaded(f"router holds {len(self.active)} unfinished requests (max_queued_requests)",
                             retry_after_s=self._settings.retry_after_s)
        now = time.monotonic()
        job = Job(request_id=f"cmpl-{uuid.uuid4().hex}", prompt_ids=prompt_ids, sampling=sampling,
                  received_s=now, deadline_s=now + self._settings.request_timeout_s)
        job.model = model
        self.active[job.request_id] = job
        self._settled[job.request_id] = asyncio.Event()
        return job

    def _begin(self, job: Job, path: ServePath, **instance: str) -> None:
        """Write the record (create → PREFILL_QUEUED → PREFILLING, one round trip) while the instance call
        goes out: TTFT does not wait for Redis. Every later write of this request waits for it first."""
        write = self._records.create(job.request_id, then=[Step(S.PREFILL_QUEUED, {"path": path.value, **instance}),
                                                           Step(S.PREFILLING)], **self._record_fields(job))
        job.record_write = asyncio.ensure_future(write)
        job.state = S.PREFILLING

    async def _flush(self, job: Job) -> None:
        """Wait for the record's first write (shielded: a cancelled request still completes it)."""
        task, job.record_write = job.record_write, None
        if task is not None:
            await asyncio.shield(task)
            job.created = True

    def _record_fields(self, job: Job) -> dict[str, str | int | float]:
        return {"model": job.model, "prompt_tokens": len(job.prompt_ids), "max_tokens": job.max_tokens}

    async def reap_overdue(self, grace_s: float = 1.0) -> list[str]:
        """Fail requests past their deadline whose generator is not running (a client that stopped reading
        but did not hang up): record FAILED, cancel their legs. The generator, if it ever resumes, stops."""
        now = time.monotonic()
        reaped = []
        for job in list(self.active.values()):
            if now > job.deadline_s + grace_s and not job.reaped:
                job.reaped = True
                reaped.append(job.request_id)
                self._metrics.errors.labels(kind="deadline_exceeded").inc()
                await self._settle(job, S.FAILED, error="DeadlineExceeded: reaped after the request deadline")
        return reaped

    async def wait_settled(self, request_id: str) -> None:
        """Returns once the request reached a terminal state (immediately when it is unknown here)."""
        event = self._settled.get(request_id)
        if event is not None:
            await event.wait()

    def _forget(self, job: Job) -> None:
        self.active.pop(job.request_id, None)
        event = self._settled.pop(job.request_id, None)
        if event is not None:
            event.set()

    async def _enter(self, job: Job, to: RequestState, handle: bytes | None = None, **fields: str | int) -> None:
        """Record a state change (or, for an allowed self-edge, another attempt of the same phase)."""
        if to == job.state and to not in ALLOWED[to]:
            return
        await self._flush(job)
        await self._records.transition(job.request_id, to=to, handle=handle, **fields)
        job.state = to

    def _enter_soon(self, job: Job, to: RequestState, handle: bytes | None = None, **fields: str | int) -> None:
        """`_enter` without waiting for Redis: for the changes between a request's tokens, which the next
        token must not wait for. The write is chained after the record's earlier writes (order and
        timestamps kept); the next `_enter` or the settle waits for it (`_flush`), so a refused edge
        surfaces there."""
        if to == job.state and to not in ALLOWED[to]:
            return
        earlier = job.record_write

        async def write() -> None:
            if earlier is not None:
                await earlier
                job.created = True
            await self._records.transition(job.request_id, to=to, handle=handle, **fields)

        job.record_write = asyncio.ensure_future(write())
        job.state = to

    async def _settle(self, job: Job, to: RequestState, **fields: str | int) -> None:
        if self.active.get(job.request_id) is not job:  # settled already (by the reaper)
            return
        try:
            try:
                await self._flush(job)
            except Exception:
                log.warning("first record write of %s failed", job.request_id, exc_info=True)
            if not job.created:  # refused before any dispatch (no instance, full queues): record the outcome
                await self._records.create(job.request_id, then=[Step(to, dict(fields))], **self._record_fields(job))
                job.created, job.state = True, to
            elif job.state not in TERMINAL:
                await self._records.try_settle(job.request_id, to=to, output_tokens=len(job.generated), **fields)
                job.state = to
            if to is not S.DONE:  # release what the legs still hold (open calls)
                for instance in job.legs.values():
                    await self._client.cancel(instance, job.request_id)
            self._release_unpulled(job)  # DONE too: a first token that ends the request leaves its KV unpulled
        except Exception:
            log.exception("could not settle %s as %s", job.request_id, to)
        finally:
            self._record_outcome(job, to)
            self._forget(job)

    def _release_unpulled(self, job: Job) -> None:
        """Give back the KV offered for `job` that no decode leg took (in a task: settling does not wait)."""
        offered, job.unpulled_kv = job.unpulled_kv, None
        if offered is not None:
            self._spawn(self._releaser.release(job.request_id, offered))

    def _record_outcome(self, job: Job, to: RequestState) -> None:
        path = job.path.value if job.path else "none"
        self._metrics.requests.labels(path=path, outcome=to.value.lower()).inc()
        if to is not S.DONE or job.first_token_s is None or job.last_token_s is None:
            return
        self._metrics.e2e_s.labels(path=path).observe(job.last_token_s - job.received_s)
        if len(job.generated) > 1:
            self._metrics.tpot_s.labels(path=path).observe(
                (job.last_token_s - job.first_token_s) / (len(job.generated) - 1))
