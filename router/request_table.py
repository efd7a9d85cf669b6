"""The requests this router holds: admission, the one way a request ends, and the reaper.

    admit()           429 when this router holds max_queued_requests; a Job with its record writer and legs
    end(job, ending)  the end of a request, however it ends (done, stop string, cancel, deadline, failure):
                        record → terminal (after its earlier writes), open calls cancelled unless it
                        completed, un-pulled KV given back, outcome metrics, forgotten.
                      The first call decides; later ones wait for it. It runs in a task of its own, so a
                      caller cancelled meanwhile (the client went away) still leaves the request settled.
    reap_overdue()    ends requests past their deadline whose generator is not running (a client that
                      stopped reading but did not hang up)
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from router.errors import Overloaded
from router.instance_client import InstanceClient
from router.job import Ending, Job
from router.kv_release import KVReleaser
from router.legs import Legs, Spawn
from router.metrics import RouterMetrics
from router.record_writer import RequestRecordWriter
from router.records import RecordStore
from router.settings import RouterSettings
from router.states import TERMINAL, RequestState
from trt_disagg.contract import SamplingParams

log = logging.getLogger(__name__)

REAPED = "DeadlineExceeded: reaped after the request deadline"


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

    def admit(self, prompt_ids: list[int], sampling: SamplingParams, model: str, stop: tuple[str, ...] = ()) -> Job:
        if len(self.active) >= self._settings.max_queued_requests:
            self._metrics.errors.labels(kind="overloaded").inc()
            raise Overloaded(f"router holds {len(self.active)} unfinished requests (max_queued_requests)",
                             retry_after_s=self._settings.retry_after_s)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        now = time.monotonic()
        record = RequestRecordWriter(self._records, request_id, {
            "model": model, "prompt_tokens": len(prompt_ids), "max_tokens": sampling.max_new_tokens})
        job = Job(request_id=request_id, prompt_ids=prompt_ids, sampling=sampling, received_s=now,
                  deadline_s=now + self._settings.request_timeout_s, record=record,
                  legs=Legs(request_id, self._client, self._releaser, self._spawn), model=model, stop=stop)
        self.active[request_id] = job
        self._settled[request_id] = asyncio.Event()
        return job

    async def end(self, job: Job, ending: Ending) -> None:
        if job.state in TERMINAL:  # ended already (the reaper, or a stop string): wait for that end
            await self.wait_settled(job.request_id)
            return
        fields: dict[str, str | int] = {**ending.fields(), "output_tokens": len(job.generated)}
        written = job.record.settle(ending.state, **fields)
        if ending.error_kind is not None:
            self._metrics.errors.labels(kind=ending.error_kind).inc()
        await asyncio.shield(self._spawn(self._finish(job, ending, written)))

    def end_soon(self, job: Job, ending: Ending) -> None:
        """`end` from where the caller cannot wait: a generator whose consumer was cancelled."""
        self._spawn(self.end(job, ending))

    async def _finish(self, job: Job, ending: Ending, written: asyncio.Future[None]) -> None:
        try:
            try:
                await written
            except Exception:
                log.exception("could not settle %s as %s", job.request_id, ending.state)
            await job.legs.close(cancel_calls=ending.state is not RequestState.DONE)
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
            await self.end(job, Ending(RequestState.FAILED, error=REAPED, error_kind="deadline_exceeded"))
        return [job.request_id for job in overdue]

    async def wait_settled(self, request_id: str) -> None:
        """Returns once the request's end is written (immediately when it is unknown here)."""
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
