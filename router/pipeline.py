"""One request, from admission to its last token: the router's request path.

    tokens(job):
      path = dispatch.choose_path(prompt)                      colocated | disaggregated
      disaggregated (DistServe's steps):
        p = pick(PREFILL)  → PREFILL_QUEUED → PREFILLING      an error: the next prefill instance (bounded)
        first, handle = prefill(p) → PREFILL_DONE              the prefill instance holds the KV for us
        yield first                                            ← TTFT
        d = pick(DECODE)   → DECODE_DISPATCHED
        stream decode(d, handle) → DECODING at its first token (d pulled the KV); yield tokens #2...
      colocated:
        c = pick(COLOCATED) → PREFILL_QUEUED → PREFILLING → DECODING at the first token; yield tokens
      admission first: a request whose estimated queueing wait exceeds its target gets 429 (admission.py)
      a leg lost mid-stream (decode or colocated instance gone, hung past leg_inactivity_timeout_s, or out
        of the registry): `_continued` runs the path again from the tokens the client has (prompt +
        generated re-prefilled; its first token is the next one), on another instance, a bounded number
        of times; when no prefill+decode pair can take it any more, a colocated instance continues it
      the end: DONE | FAILED (a RouterError, with its reason) | CANCELLED (the consumer went away), or DONE
        at a stop string (the consumer calls `stop_at_string`); one call, `RequestTable.end`

Every instance call runs under the request's deadline. The generator never repeats or drops a token:
`job.generated` is the single list of what the client received, and every continuation starts from it.
State changes between tokens are queued, not awaited (`RequestRecordWriter`), and queued before the token
is yielded: a consumer that ends the request at that token still leaves a record that walks to DONE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import NoReturn

from router.admission import Admission
from router.dispatch import Dispatcher, ServePath
from router.ending import Ending
from router.errors import (
    BadRequest,
    InstanceFailed,
    InstanceUnavailable,
    KVTransferFailed,
    Overloaded,
    RouterError,
    ShuttingDown,
)
from router.instance_client import InstanceClient, InstanceError, PrefillResult
from router.job import Job, with_max
from router.leg_waits import deadline_timeout, deadlined, wait_failed
from router.metrics import RouterMetrics
from router.request_table import RequestTable
from router.settings import RouterSettings
from router.states import TERMINAL, RequestState
from trt_disagg.contract import ErrorKind, InstanceInfo, Role

log = logging.getLogger(__name__)

S = RequestState
_KV_KINDS = frozenset({ErrorKind.KV_TRANSFER_FAILED, ErrorKind.INVALID_HANDLE})  # the hand-off itself failed
Leg = Callable[[Job, frozenset[str]], AsyncGenerator[int, None]]


class LegLost(Exception):
    """An instance call of a request failed in a way another instance may not (it died, it was overloaded)."""

    def __init__(self, instance: InstanceInfo, phase: Role, cause: InstanceError) -> None:
        super().__init__(str(cause))
        self.instance = instance
        self.phase = phase  # PREFILL or DECODE: which retry budget it spends
        self.cause = cause


class RequestRunner:
    """Runs each admitted request's token stream over the instances; `requests` keeps and ends them."""

    def __init__(self, settings: RouterSettings, requests: RequestTable, dispatcher: Dispatcher,
                 client: InstanceClient, metrics: RouterMetrics) -> None:
        self._settings = settings
        self.requests = requests
        self.admission = Admission(dispatcher, target_s=settings.admission_target_s or settings.request_timeout_s,
                                   window_s=settings.admission_window_s)
        self._dispatch = dispatcher
        self._client = client
        self._metrics = metrics
        # labelled children looked up once: the per-token path must stay cheap
        self._ttft = {p: metrics.ttft_s.labels(path=p.value) for p in ServePath}
        self._itl = {p: metrics.itl_s.labels(path=p.value) for p in ServePath}
        self._queued = {p: metrics.queued.labels(pool=p.value) for p in ServePath}

    # ---- the token stream ---------------------------------------------------------------------------

    async def tokens(self, job: Job) -> AsyncGenerator[int, None]:
        """The tokens the client receives, each exactly once; the request is ended however this ends."""
        try:
            async with aclosing(self._run(job)) as run:
                async for token in run:
                    yield token
        except RouterError as exc:
            await self.requests.end(job, Ending.failed(exc))
            raise
        except Exception as exc:
            await self.requests.end(job, Ending.internal(exc))
            raise
        else:
            await self.requests.end(job, Ending.done(job.finish_reason or "stop"))
        finally:
            if job.state not in TERMINAL:  # closed or cancelled by its consumer: the client went away
                self.requests.end_soon(job, Ending.cancelled("client disconnected"))

    async def stop_at_string(self, job: Job) -> None:
        """The text reached a stop string: the request ends here, normally; what its instances would still
        generate is cancelled when the consumer then closes the token stream."""
        job.finish_reason = "stop"
        await self.requests.end(job, Ending.done("stop"))

    async def _run(self, job: Job) -> AsyncGenerator[int, None]:
        local = self._dispatch.kv.local_target(self._dispatch, job.prompt_ids) if self._dispatch.kv else None
        path = ServePath.LOCAL if local is not None else self._dispatch.choose_path(len(job.prompt_ids))
        if path is None:
            raise InstanceUnavailable("no prefill+decode pair and no colocated instance is up")
        job.path = path
        self.admission.check(path, len(job.prompt_ids), waited_s=time.monotonic() - job.received_s,
                             retry_count=job.retry_count)
        self._metrics.in_flight.labels(pool=path.value).inc()
        self._queued[path].inc()  # until its first token (_accept) or its end
        leg = {ServePath.COLOCATED: self._colocated, ServePath.LOCAL: self._local}.get(path, self._disaggregated)
        try:
            async with aclosing(self._continued(job, leg)) as tokens:
                async for token in tokens:
                    yield token
        finally:
            self._metrics.in_flight.labels(pool=path.value).dec()
            if job.first_token_s is None:
                self._queued[path].dec()

    # ---- the two paths --------------------------------------------------------------------------------

    async def _disaggregated(self, job: Job, lost_decodes: frozenset[str]) -> AsyncGenerator[int, None]:
        prefilled = await self._try_prefill(job, lost_decodes)  # pick prefill → prefill (first token, handle)
        if prefilled is None:  # no prefill+decode pair can take it: a colocated instance does, from here
            async for token in self._colocated(job, frozenset()):
                yield token
            return
        handed_off_s = time.monotonic()
        if self._accept(job, prefilled.first_token):
            yield prefilled.first_token  # TTFT (the consumer may end the request here: a stop string)
        if job.complete:
            return
        decode = self._pick(Role.DECODE, lost_decodes, job.prompt_ids)  # now: the load changed meanwhile
        async for token in self._decode(job, decode, prefilled.handle, handed_off_s):
            yield token

    async def _try_prefill(self, job: Job, lost_decodes: frozenset[str]) -> PrefillResult | None:
        """`_prefill`, or None when the request should move to a colocated instance instead: no decode
        instance is left, or every prefill instance tried failed, while a colocated instance is up."""
        try:
            self._require(Role.DECODE, lost_decodes)  # no decode instance left: fail before prefilling
            return await self._prefill(job)
        except (InstanceUnavailable, InstanceFailed) as exc:
            if isinstance(exc, ShuttingDown) or not self._dispatch.candidates(Role.COLOCATED):
                raise
            log.warning("%s: %s; continuing on a colocated instance", job.request_id, exc.message)
            self._metrics.retries.labels(phase="prefill" if job.first_token_s is None else "decode").inc()
            return None

    async def _prefill(self, job: Job) -> PrefillResult:
        """Prefill prompt + tokens so far, on another prefill instance after an error (bounded)."""
        context = job.prompt_ids + job.generated
        sampling = with_max(job.sampling, job.remaining)
        tried: list[LegLost] = []
        for _ in range(self._settings.max_prefill_retries + 1):
            prefill = self._dispatch.pick(Role.PREFILL, frozenset(t.instance.instance_id for t in tried), context)
            if prefill is None:
                break
            job.record.dispatch(ServePath.DISAGGREGATED, prefill_instance=prefill.instance_id,
                                **self._prefix_fields(prefill, context, Role.PREFILL.value),
                                **({"prefilled_tokens": len(context)} if job.state is not S.RECEIVED else {}))
            started = time.monotonic()
            try:
                async with self._leg(job, Role.PREFILL, prefill, prompt_tokens=len(context)) as call_id:
                    try:
                        async with deadline_timeout(job) as wait:
                            job.legs.waiting[Role.PREFILL] = wait
                            result = await self._client.prefill(prefill, call_id, context, sampling)
                    except TimeoutError:
                        raise wait_failed(job, Role.PREFILL, prefill, "during prefill",
                                          self._settings.leg_inactivity_timeout_s) from None
            except LegLost as lost:
                self._metrics.retries.labels(phase="prefill").inc()
                log.warning("prefill of %s failed on %s: %s", job.request_id, prefill.instance_id, lost)
                tried.append(lost)
                continue
            self._metrics.prefill_s.observe(time.monotonic() - started)
            self.admission.prefilled(ServePath.DISAGGREGATED, len(context), time.monotonic() - started)
            job.legs.offer(prefill, result.handle)
            if job.state is S.PREFILLING:  # a re-prefill (continuing a lost decode leg) is not a new phase
                job.record.enter_with_handle(S.PREFILL_DONE, result.handle, first_token=result.first_token)
            return result
        self._prefill_failed(tried)

    async def _decode(self, job: Job, decode: InstanceInfo, handle: bytes,
                      handed_off_s: float) -> AsyncGenerator[int, None]:
        """Stream tokens #2... from `decode`, which pulls the prefill's KV by `handle` at its first step."""
        first_leg = job.state is S.PREFILL_DONE
        job.record.enter(S.DECODE_DISPATCHED if first_leg else job.state, decode_instance=decode.instance_id,
                         **({} if first_leg else {"resumed_after_tokens": len(job.generated)}))
        context = job.prompt_ids + job.generated[:-1]
        sampling = with_max(job.sampling, job.remaining + 1)  # counts the first token it continues from
        async with self._leg(job, Role.DECODE, decode, sequences=1) as call_id:
            stream = self._client.decode_stream(decode, call_id, context, job.generated[-1], handle, sampling)
            async for token in deadlined(stream, job, Role.DECODE, decode, self._settings.leg_inactivity_timeout_s):
                job.legs.pulled()
                if job.state is S.DECODE_DISPATCHED:
                    self._metrics.kv_handoff_s.observe(time.monotonic() - handed_off_s)
                    job.record.enter(S.DECODING)
                if self._accept(job, token):
                    yield token
                if job.complete:
                    return
        job.legs.pulled()  # the decode leg completed: it had taken the KV
        job.finish_reason = job.finish_reason or "stop"

    async def _colocated(self, job: Job, lost: frozenset[str]) -> AsyncGenerator[int, None]:
        inst = self._pick(Role.COLOCATED, lost, job.prompt_ids)
        job.record.dispatch(ServePath.COLOCATED, colocated_instance=inst.instance_id,
                            **self._prefix_fields(inst, job.prompt_ids + job.generated, Role.COLOCATED.value),
                            **({"resumed_after_tokens": len(job.generated)} if job.state is not S.RECEIVED else {}))
        context = job.prompt_ids + job.generated
        async for token in self._generate(job, Role.COLOCATED, inst, context, prompt_tokens=len(context),
                                          pool=ServePath.COLOCATED):
            yield token

    async def _local(self, job: Job, lost: frozenset[str]) -> AsyncGenerator[int, None]:
        """Conditional disaggregation by overlap (kv_aware): the decode or colocated instance that holds all
        but a short suffix of the prompt prefills that suffix itself, then decodes; no prefill instance and
        no KV transfer. Without such an instance (it was lost, or its cache moved on) the usual path runs."""
        context = job.prompt_ids + job.generated
        match = self._dispatch.kv.local_target(self._dispatch, context, lost) if self._dispatch.kv else None
        if match is None:
            usual = self._colocated if self._dispatch.choose_path(len(context)) is ServePath.COLOCATED \
                else self._disaggregated
            async for token in usual(job, lost):
                yield token
            return
        inst = match.instance
        job.record.dispatch(ServePath.LOCAL, local_instance=inst.instance_id,
                            **self._prefix_fields(inst, context, ServePath.LOCAL.value),
                            **({"resumed_after_tokens": len(job.generated)} if job.state is not S.RECEIVED else {}))
        suffix = len(context) - match.matched_tokens
        async for token in self._generate(job, match.role, inst, context, prompt_tokens=suffix, pool=ServePath.LOCAL):
            yield token

    async def _generate(self, job: Job, role: Role, inst: InstanceInfo, context: list[int], *,
                        prompt_tokens: int, pool: ServePath) -> AsyncGenerator[int, None]:
        """One context_and_generation leg on `inst` (colocated, or a local prefill where the prefix is held):
        PREFILLING until its first token, DECODING after; `prompt_tokens` is the prefill work it adds there."""
        started = time.monotonic()
        async with self._leg(job, role, inst, prompt_tokens=prompt_tokens, sequences=1) as call_id:
            stream = self._client.generate_stream(inst, call_id, context, with_max(job.sampling, job.remaining))
            async for token in deadlined(stream, job, role, inst, self._settings.leg_inactivity_timeout_s):
                if job.state is S.PREFILLING:  # before the yield: the consumer may stop there
                    job.record.enter(S.DECODING)
                    self.admission.prefilled(pool, prompt_tokens, time.monotonic() - started)
                if self._accept(job, token):
                    yield token
                if job.complete:
                    return
        if job.state is S.PREFILLING:
            raise InstanceFailed(f"instance {inst.instance_id} ended the stream without a token")
        job.finish_reason = job.finish_reason or "stop"

    def _prefix_fields(self, inst: InstanceInfo, context: list[int], pool: str) -> dict[str, str | int]:
        """The prompt tokens `inst` holds per the block index: counted per pool (hit rate) and written to the
        record (GET /v1/requests/{id} shows matched_tokens and matched_instance). Empty without an index."""
        kv = self._dispatch.kv
        if kv is None:
            return {}
        matched = kv.matched_on(inst, context)
        self._metrics.observe_prefix(pool, len(context), matched)
        return {"matched_tokens": matched, "matched_instance": inst.instance_id}

    async def _continued(self, job: Job, leg: Leg) -> AsyncGenerator[int, None]:
        """`leg` until the request is complete: a leg lost mid-stream is run again on another instance, from
        the tokens the client has, while the retry budget of the phase it was lost in lasts."""
        lost: list[LegLost] = []
        while True:
            try:
                async with aclosing(leg(job, frozenset(x.instance.instance_id for x in lost))) as tokens:
                    async for token in tokens:
                        yield token
                return
            except LegLost as exc:
                lost.append(exc)
                self._metrics.retries.labels(phase=exc.phase.value).inc()
                budget = (self._settings.max_prefill_retries if exc.phase is Role.PREFILL
                          else self._settings.max_decode_retries)
                if len(lost) > budget:
                    what = "decode failed on {} instance(s)" if job.path is ServePath.DISAGGREGATED \
                        else "colocated instance(s) failed {} time(s)"
                    failed = KVTransferFailed if exc.cause.kind in _KV_KINDS else InstanceFailed
                    raise failed(f"{what.format(len(lost))}: {exc}") from None
                log.warning("%s leg of %s lost on %s after %d tokens: %s; continuing elsewhere", exc.phase,
                            job.request_id, exc.instance.instance_id, len(job.generated), exc)

    # ---- one token, one leg ---------------------------------------------------------------------------

    def _accept(self, job: Job, token: int) -> bool:
        """Take one token from an instance; False when it is not for the client (the end token, or past
        the budget). Sets `finish_reason` when the request is complete."""
        if job.record.ending is not None:  # ended while this generator waited (the reaper, a drain)
            raise job.record.ending.error_for_generator()
        if job.remaining <= 0:
            return False
        now = time.monotonic()
        if job.sampling.end_id is not None and token == job.sampling.end_id:
            job.finish_reason = "stop"
            return False
        path = job.path or ServePath.DISAGGREGATED
        if job.last_token_s is not None:
            self._itl[path].observe(now - job.last_token_s)
        else:
            job.first_token_s = now
            self._ttft[path].observe(now - job.received_s)
            self._queued[path].dec()
        job.last_token_s = now
        job.generated.append(token)
        self._metrics.tokens.inc()
        if job.remaining <= 0:
            job.finish_reason = "length"
        return True

    @asynccontextmanager
    async def _leg(self, job: Job, role: Role, inst: InstanceInfo, *, prompt_tokens: int = 0,
                   sequences: int = 0) -> AsyncIterator[str]:
        """One instance call: counted as outstanding on `inst`, held in `job.legs`; yields the id the call
        gives the instance. An instance error becomes `LegLost` unless no instance would do better."""
        job.legs.open[role] = inst
        job.legs.abandoned.pop(role, None)  # a new leg: what abandoned the previous one does not apply
        try:
            with self._dispatch.lease(inst.instance_id, prompt_tokens=prompt_tokens, sequences=sequences):
                yield job.legs.call_id(role)
        except InstanceError as exc:
            phase = Role.PREFILL if role is Role.PREFILL or job.state is S.PREFILLING else Role.DECODE
            await job.legs.lost(role)
            if job.record.ending is not None:  # ended meanwhile (the reaper, a drain): no retry
                raise job.record.ending.error_for_generator() from None
            if exc.kind == ErrorKind.BAD_REQUEST:  # any other instance would say the same: a 400
                raise BadRequest(f"an instance refused the request: {exc}") from None
            raise LegLost(inst, phase, exc) from exc

    # ---- choosing an instance -----------------------------------------------------------------------

    def _pick(self, role: Role, exclude: frozenset[str], prompt_ids: list[int] | None = None) -> InstanceInfo:
        inst = self._dispatch.pick(role, exclude, prompt_ids or ())
        if inst is not None:
            return inst
        self._unavailable(role, exclude)

    def _require(self, role: Role, exclude: frozenset[str]) -> None:
        """Fail now, without choosing (a choice takes a policy's turn), when no `role` instance is left."""
        if not self._dispatch.candidates(role, exclude):
            self._unavailable(role, exclude)

    def _unavailable(self, role: Role, exclude: frozenset[str]) -> NoReturn:
        if not exclude and self._dispatch.saturated(role):
            self._metrics.errors.labels(kind="overloaded").inc()
            raise Overloaded(f"every {role.value} instance has a full queue",
                             retry_after_s=self._settings.retry_after_s)
        tried = f" (tried {', '.join(sorted(exclude))})" if exclude else ""
        raise InstanceUnavailable(f"no {role.value} instance available{tried}")

    def _prefill_failed(self, tried: list[LegLost]) -> NoReturn:
        if not tried:
            self._unavailable(Role.PREFILL, frozenset())
        last = tried[-1].cause
        if all(t.cause.kind == ErrorKind.OVERLOADED for t in tried):
            raise Overloaded(f"every prefill instance tried is overloaded: {last}",
                             retry_after_s=self._settings.retry_after_s)
        raise InstanceFailed(f"prefill failed on {len(tried)} instance(s): {last}")
