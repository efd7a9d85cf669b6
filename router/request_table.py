"""The requests this router holds: admission, the one way a request ends, and the reaper.

    admit()           429 when this router holds max_queued_requests; a Job with its record writer and legs
    end(job, ending)  the end of a request, however it ends (done, stop string, cancel, deadline, failure):
                        record → terminal (after its earlier writes), open calls cancelled unless it
                        completed, un-pulled KV given back, outcome metrics, forgotten.
                      The first call decides; later ones wait for it. It runs in a task of its own, so a
                      caller cancelled meanwhile (the client went away) still leaves the request settled.
    reap_overdue()    ends requests past their deadline whose generator is not running (a client that
                      stopped reading but did not hang up)
    abandon_legs_on(instance)   the instance stopped beating: its legs give up now and continue elsewhere
    drain(timeout)    stop admitting (503), let what is in flight finish, then end the rest with a
                      shutting_down error (an SSE error event for a stream) and settle their records
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from router.ending import Ending
from router.errors import DeadlineExceeded, InstanceUnavailable, Overloaded, ShuttingDown
from router.instance_client import InstanceClient, InstanceLost
from router.job import Job
from router.kv_release import KVReleaser
from router.legs import Legs, Spawn
from router.metrics import RouterMetrics
from router.record_writer import RequestRecordWriter
from router.records import RecordStore
from router.settings import RouterSettings
from router.states import TERMINAL, RequestState
from trt_disagg.contract import SamplingParams

log = logging.getLogger(__name__)

REAPED = "request deadline passed (reaped)"


class RequestTable:
    def __init__(self, settings: RouterSettings, records: RecordStore, client: InstanceClient,
                 releaser: KVReleaser, metrics: RouterMetrics, spawn: Spawn) -> None:
        self._settings = settings
        self._records = records
        self._client = client
        self._releaser = releaser
        self._metrics = metrics
        self._spawn = spawn
        self.active: dict[str, Job] = {}
        self._settled: dict[str, asyncio.Event] = {}
        self._stopping: ShuttingDown | None = None  # set by drain(): admission refuses with it
        self._records_down: InstanceUnavailable | None = None  # set while Redis is unreachable

    def admit(self, prompt_ids: list[int], sampling: SamplingParams, model: str, stop: tuple[str, ...] = (),
              received_s: float | None = None, retry_count: int | None = None) -> Job:
        """A new job; `received_s` (monotonic) is when the router first saw it, which starts its clock;
        `retry_count`: how many times the client says it sent this before (admission paces refused clients
        apart), None when it does not say."""
        if self._stopping is not None:
            raise self._stopping
        if self._records_down is not None:  # fail fast: the request could not be recorded (see record_writer)
            raise self._records_down
        if len(self.active) >= self._settings.max_queued_requests:
            self._metrics.errors.labels(kind="overloaded").inc()
            raise Overloaded(f"router holds {len(self.active)} unfinished requests (max_queued_requests)",
                             retry_after_s=self._settings.retry_after_s)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        now = time.monotonic()
        record = RequestRecordWriter(self._records, request_id, {
            "model": model, "prompt_tokens": len(prompt_ids), "max_tokens": sampling.max_new_tokens},
            retry_s=self._settings.record_retry_s)
        received = now if received_s is None else min(received_s, now)
        job = Job(request_id=request_id, prompt_ids=prompt_ids, sampling=sampling, received_s=received,
                  deadline_s=received + self._settings.request_timeout_s, record=record,
                  legs=Legs(request_id, self._client, self._releaser, self._spawn), model=model, stop=stop,
                  retry_count=retry_count)
        self.active[request_id] = job
        self._settled[request_id] = asyncio.Event()
        return job

    async def end(self, job: Job, ending: Ending) -> None:
        if job.state in TERMINAL:  # ended already (the reaper, or a stop string): wait for that end
            await self.wait_settled(job.request_id)
            return
        written = job.record.settle(ending, output_tokens=len(job.generated))
        if ending.error_kind is not None:
            self._metrics.errors.labels(kind=ending.error_kind).inc()
        await asyncio.shield(self._spawn(self._finish(job, ending, written)))

    def end_soon(self, job: Job, ending: Ending) -> None:
        """`end` from where the caller cannot wait: a generator whose consumer was cancelled."""
        self._spawn(self.end(job, ending))

    async def _finish(self, job: Job, ending: Ending, written: asyncio.Future[None]) -> None:
        try:
            await job.legs.close(cancel_calls=ending.state is not RequestState.DONE)
            try:  # the end waits for its record a bounded time; during a Redis outage the write goes on alone
                await asyncio.wait_for(asyncio.shield(written), self._settings.record_wait_s)
            except TimeoutError:
                log.warning("the record of %s is not settled yet (Redis slow or unreachable); still trying",
                            job.request_id)
            except Exception:
                log.exception("could not settle %s as %s", job.request_id, ending.state)
        finally:
            self._observe_outcome(job, ending.state)
            self.active.pop(job.request_id, None)
            event = self._settled.pop(job.request_id, None)
            if event is not None:
                event.set()

    async def reap_overdue(self, grace_s: float = 1.0) -> list[str]:
        """End requests past their deadline as FAILED. Their generator, if it ever resumes, stops there."""
        now = time.monotonic()
        overdue = [job for job in self.active.values() if now > job.deadline_s + grace_s and job.state not in TERMINAL]
        for job in overdue:
            await self.end(job, Ending.failed(DeadlineExceeded(REAPED)))
        return [job.request_id for job in overdue]

    def records_available(self, available: bool) -> None:
        """What the last Redis round trip said; while Redis is unreachable new requests get 503."""
        self._records_down = None if available else InstanceUnavailable(
            "request records are unavailable (Redis unreachable); retry shortly")

    def abandon_legs_on(self, instance_id: str) -> list[str]:
        """Give up every leg running on `instance_id` (it left the registry: crashed, hung or partitioned);
        each continues on another instance as a lost leg does. Returns the requests affected."""
        hit = []
        for job in self.active.values():
            for role in job.legs.on(instance_id):
                job.legs.abandon(role, InstanceLost(instance_id, "the instance stopped heartbeating"))
                hit.append(job.request_id)
        return hit

    async def drain(self, timeout_s: float) -> list[str]:
        """Stop admitting; wait up to `timeout_s` for the requests in flight; end the rest with ShuttingDown
        (their legs are abandoned, so a stream ends with an error event). Returns the requests cut short."""
        self._stopping = ShuttingDown("the router is shutting down")
        try:
            async with asyncio.timeout(timeout_s):
                while self.active:
                    await next(iter(self._settled.values())).wait()
            return []
        except TimeoutError:
            pass
        cut = list(self.active.values())
        for job in cut:
            for role in list(job.legs.open):
                job.legs.abandon(role, self._stopping)
        # a leg that gives up ends its request itself; one that is not waiting on an instance (its client
        # stopped reading) is ended here
        await asyncio.gather(*(self.end(job, Ending.failed(self._stopping)) for job in cut))
        return [job.request_id for job in cut]

    async def wait_settled(self, request_id: str) -> None:
        """Returns once the request has ended and its record is written, or the write is still retrying after
        record_wait_s (Redis unreachable); immediately when the request is unknown here."""
        event = self._settled.get(request_id)
        if event is not None:
            await event.wait()

    def _observe_outcome(self, job: Job, to: RequestState) -> None:
        path = job.path.value if job.path else "none"
        self._metrics.requests.labels(path=path, outcome=to.value.lower()).inc()
        if to is not RequestState.DONE or job.first_token_s is None or job.last_token_s is None:
            return
        self._metrics.e2e_s.labels(path=path).observe(job.last_token_s - job.received_s)
        if len(job.generated) > 1:
            self._metrics.tpot_s.labels(path=path).observe(
                (job.last_token_s - job.first_token_s) / (len(job.generated) - 1))
