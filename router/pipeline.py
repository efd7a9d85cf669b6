"""One request, from admission to its last token: the router's request path.

    admit()            429 when this router holds max_queued_requests; record created in RECEIVED
    tokens(job):
      path = dispatch.choose_path(prompt)                      colocated | disaggregated
      disaggregated:
        p = pick(PREFILL)   → PREFILL_QUEUED → PREFILLING      (error: next prefill instance, bounded)
        first, handle = prefill(p)  → PREFILL_DONE (handle stored with a TTL); yield first   ← TTFT
        d = pick(DECODE)    → DECODE_DISPATCHED
        decode_stream(d, handle)    → DECODING at its first token; yield tokens #2...
        decode leg lost:  re-prefill prompt + tokens so far on a prefill instance (its first token is the
                          next token, streamed once), then decode on another instance (bounded)
        the prefill KV is the request's until a decode leg streams from it; a request that ends before
        (cancel, deadline, failure, first token ends it) or a decode leg lost before its first token gives
        it back to the prefill instance at once (job.unpulled_kv, kv_release.py) instead of at its TTL
      colocated:
        c = pick(COLOCATED) → PREFILL_QUEUED → PREFILLING → DECODING at the first token; yield tokens
      DONE (also when the consumer closes the stream at a stop string, router/text.py)
      | FAILED (a RouterError, recorded with its reason) | CANCELLED (the consumer went away)

Every instance call runs under the request's deadline. The generator never repeats or drops a token:
`job.generated` is the single list of what the client received, and every continuation starts from it.
A CANCELLED settle runs in a task of its own, because the consumer's cancel scope is still cancelled
while the generator unwinds. Admission, the record and settling are `RequestLifecycle`'s (lifecycle.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import NoReturn

from router.dispatch import Dispatcher, ServePath
from router.errors import (
    BadRequest,
    DeadlineExceeded,
    InstanceFailed,
    InstanceUnavailable,
    Overloaded,
    RouterError,
)
from router.instance_client import (
    TAG_BAD_REQUEST,
    TAG_OVERLOADED,
    InstanceClient,
    InstanceError,
    PrefillResult,
)
from router.job import Job, with_max
from router.kv_release import KVReleaser, OfferedKV
from router.lifecycle import RequestLifecycle, Spawn
from router.metrics import RouterMetrics
from router.records import RecordStore
from router.settings import RouterSettings
from router.states import RequestState
from trt_disagg.contract import InstanceInfo, Role

log = logging.getLogger(__name__)

S = RequestState


class RequestRunner(RequestLifecycle):
    """Runs each admitted request's token stream over the instances (the bookkeeping is RequestLifecycle's)."""

    def __init__(self, settings: RouterSettings, records: RecordStore, dispatcher: Dispatcher,
                 client: InstanceClient, releaser: KVReleaser, metrics: RouterMetrics, spawn: Spawn) -> None:
        super().__init__(settings, records, dispatcher, client, releaser, metrics, spawn)
        # labelled children looked up once: the per-token path must stay cheap
        self._ttft = {p: metrics.ttft_s.labels(path=p.value) for p in ServePath}
        self._itl = {p: metrics.itl_s.labels(path=p.value) for p in ServePath}
        self._queued = {p: metrics.queued.labels(pool=p.value) for p in ServePath}

    # ---- the token stream ---------------------------------------------------------------------------

    async def tokens(self, job: Job) -> AsyncGenerator[int, None]:
        """The tokens the client receives, each exactly once; settles the record however it ends."""
        outcome: RequestState | None = None
        try:
            async for token in self._run(job):
                yield token
            outcome = S.DONE
            await self._settle(job, S.DONE, finish_reason=job.finish_reason or "stop")
        except RouterError as exc:
            outcome = S.FAILED
            self._metrics.errors.labels(kind=exc.code or exc.type).inc()
            await self._settle(job, S.FAILED, error=f"{type(exc).__name__}: {exc.message}")
            raise
        except Exception as exc:
            outcome = S.FAILED
            self._metrics.errors.labels(kind="internal").inc()
            await self._settle(job, S.FAILED, error=f"internal: {type(exc).__name__}")
            raise
        finally:
            if outcome is None and job.stopped_at_string:  # closed by the consumer at a stop string
                # a normal end: the record says DONE before the client reads [DONE], as for any other end;
                # shielded, so a consumer cancelled meanwhile (client gone) still leaves it settled
                await asyncio.shield(self._spawn(self._settle(job, S.DONE, finish_reason="stop")))
            elif outcome is None:  # cancelled or closed by the consumer: the client went away
                self._spawn(self._settle(job, S.CANCELLED, error="client disconnected"))

    async def _run(self, job: Job) -> AsyncGenerator[int, None]:
        path = self._dispatch.choose_path(len(job.prompt_ids))
        if path is None:
            raise InstanceUnavailable("no prefill+decode pair and no colocated instance is up")
        job.path = path
        self._metrics.in_flight.labels(pool=path.value).inc()
        self._queued[path].inc()  # until its first token (_accept) or its end
        try:
            run = self._colocated(job) if path is ServePath.COLOCATED else self._disaggregated(job)
            async with aclosing(run) as tokens:
                async for token in tokens:
                    yield token
        finally:
            self._metrics.in_flight.labels(pool=path.value).dec()
            if job.first_token_s is None:
                self._queued[path].dec()

    def _accept(self, job: Job, token: int) -> bool:
        """Take one token from an instance; False when the request is complete (the token may be the end)."""
        if job.reaped:
            raise DeadlineExceeded("request deadline passed (reaped)")
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

    def _pick(self, role: Role, exclude: set[str]) -> InstanceInfo:
        inst = self._dispatch.pick(role, frozenset(exclude))
        if inst is not None:
            return inst
        self._unavailable(role, exclude)

    def _require(self, role: Role, exclude: set[str]) -> None:
        """Fail now, without choosing (a choice takes a policy's turn), when no `role` instance is left."""
        if not self._dispatch.candidates(role, frozenset(exclude)):
            self._unavailable(role, exclude)

    def _unavailable(self, role: Role, exclude: set[str]) -> NoReturn:
        if not exclude and self._dispatch.saturated(role):
            self._metrics.errors.labels(kind="overloaded").inc()
            raise Overloaded(f"every {role.value} instance has a full queue",
                             retry_after_s=self._settings.retry_after_s)
        tried = f" (tried {', '.join(sorted(exclude))})" if exclude else ""
        raise InstanceUnavailable(f"no {role.value} instance available{tried}")

    async def _deadlined(self, stream: AsyncGenerator[int, None], job: Job) -> AsyncGenerator[int, None]:
        """`stream` with the request's deadline on every wait for the next token."""
        while True:
            try:
                async with self._timeout(job):
                    token = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded("request deadline passed while generating") from None
            yield token

    def _timeout(self, job: Job) -> asyncio.Timeout:
        loop_now = asyncio.get_running_loop().time()
        return asyncio.timeout_at(loop_now + (job.deadline_s - time.monotonic()))

    async def _prefill(self, job: Job) -> PrefillResult:
        """Prefill prompt + tokens so far, on another prefill instance after an error (bounded)."""
        context = job.prompt_ids + job.generated
        sampling = with_max(job.sampling, job.remaining)
        tried: set[str] = set()
        kinds: set[str] = set()
        last_error: InstanceError | None = None
        for _ in range(self._settings.max_prefill_retries + 1):
            try:
                inst = self._pick(Role.PREFILL, tried)
            except InstanceUnavailable:
                if last_error is None:
                    raise
                break
            if job.state is S.RECEIVED:
                self._begin(job, ServePath.DISAGGREGATED, prefill_instance=inst.instance_id)
            else:  # a retry, or a re-prefill for a lost decode leg: an event in the current state
                await self._enter(job, job.state, prefill_instance=inst.instance_id,
                                  prefilled_tokens=len(context))
            job.legs["prefill"] = inst
            started = time.monotonic()
            try:
                with self._dispatch.lease(inst.instance_id, prompt_tokens=len(context)):
                    async with self._timeout(job):
                        result = await self._client.prefill(inst, job.call_id("prefill"), context, sampling)
            except TimeoutError:
                raise DeadlineExceeded("request deadline passed during prefill") from None
            except InstanceError as exc:
                job.legs.pop("prefill", None)
                _stop_if_final(job, exc)
                log.warning("prefill of %s failed on %s: %s", job.request_id, inst.instance_id, exc)
                self._metrics.retries.labels(phase="prefill").inc()
                tried.add(inst.instance_id)
                last_error = exc
                kinds.add(exc.kind)
                continue
            self._metrics.prefill_s.observe(time.monotonic() - started)
            return result
        if kinds == {TAG_OVERLOADED}:
            raise Overloaded(f"every prefill instance tried is overloaded: {last_error}",
                             retry_after_s=self._settings.retry_after_s)
        raise InstanceFailed(f"prefill failed on {len(tried)} instance(s): {last_error}")

    async def _disaggregated(self, job: Job) -> AsyncGenerator[int, None]:
        lost_decodes: set[str] = set()
        while True:
            self._require(Role.DECODE, lost_decodes)  # when no decode instance is left, fail before prefilling
            result = await self._prefill(job)
            job.unpulled_kv = OfferedKV(job.legs["prefill"], result.handle)
            handed_off_s = time.monotonic()
            accepted = self._accept(job, result.first_token)
            if job.state is S.PREFILLING:  # queued, not awaited: the first token does not wait for Redis
                self._enter_soon(job, S.PREFILL_DONE, handle=result.handle, first_token=result.first_token)
            if accepted:
                yield result.first_token  # TTFT (the consumer may end the request here: a stop string)
            if not accepted or job.remaining <= 0:
                return
            decode = self._pick(Role.DECODE, lost_decodes)  # chosen now: the load changed during the prefill
            if job.state is S.PREFILL_DONE:
                self._enter_soon(job, S.DECODE_DISPATCHED, decode_instance=decode.instance_id)
            else:
                await self._enter(job, job.state, decode_instance=decode.instance_id,
                                  resumed_after_tokens=len(job.generated))
            context = job.prompt_ids + job.generated[:-1]
            sampling = with_max(job.sampling, job.remaining + 1)  # counts the first token it continues from
            job.legs["decode"] = decode
            try:
                with self._dispatch.lease(decode.instance_id, sequences=1):
                    stream = self._client.decode_stream(decode, job.call_id("decode"), context, job.generated[-1],
                                                        result.handle, sampling)
                    async with aclosing(stream):
                        async for token in self._deadlined(stream, job):
                            job.unpulled_kv = None  # a decode token: the decode instance holds the KV now
                            accepted = self._accept(job, token)
                            if job.state is S.DECODE_DISPATCHED:
                                self._metrics.kv_handoff_s.observe(time.monotonic() - handed_off_s)
                                self._enter_soon(job, S.DECODING)
                            if accepted:
                                yield token
                            if not accepted or job.remaining <= 0:
                                return
                job.unpulled_kv = None  # the decode leg completed: it had taken the KV
                job.finish_reason = job.finish_reason or "stop"
                return
            except InstanceError as exc:
                job.legs.pop("decode", None)
                _stop_if_final(job, exc)
                offered, job.unpulled_kv = job.unpulled_kv, None
                if offered is not None:  # lost before its first token: the KV may still sit on the prefill side
                    await self._releaser.release(job.request_id, offered)
                lost_decodes.add(decode.instance_id)
                self._metrics.retries.labels(phase="decode").inc()
                if len(lost_decodes) > self._settings.max_decode_retries:
                    raise InstanceFailed(f"decode failed on {len(lost_decodes)} instance(s): {exc}") from None
                log.warning("decode leg of %s lost on %s after %d tokens: %s; continuing elsewhere",
                            job.request_id, decode.instance_id, len(job.generated), exc)

    async def _colocated(self, job: Job) -> AsyncGenerator[int, None]:
        lost: set[str] = set()
        while True:
            inst = self._pick(Role.COLOCATED, lost)
            if job.state is S.RECEIVED:
                self._begin(job, ServePath.COLOCATED, colocated_instance=inst.instance_id)
            else:
                await self._enter(job, job.state, colocated_instance=inst.instance_id,
                                  resumed_after_tokens=len(job.generated))
            context = job.prompt_ids + job.generated
            job.legs["colocated"] = inst
            try:
                with self._dispatch.lease(inst.instance_id, prompt_tokens=len(context), sequences=1):
                    stream = self._client.generate_stream(inst, job.call_id("colocated"), context,
                                                          with_max(job.sampling, job.remaining))
                    async with aclosing(stream):
                        async for token in self._deadlined(stream, job):
                            accepted = self._accept(job, token)
                            if job.state is S.PREFILLING:  # before the yield: the consumer may stop there
                                self._enter_soon(job, S.DECODING)
                            if accepted:
                                yield token
                            if not accepted or job.remaining <= 0:
                                return
                if job.state is S.PREFILLING:
                    raise InstanceFailed(f"colocated instance {inst.instance_id} ended the stream without a token")
                job.finish_reason = job.finish_reason or "stop"
                return
            except InstanceError as exc:
                job.legs.pop("colocated", None)
                _stop_if_final(job, exc)
                lost.add(inst.instance_id)
                phase = "prefill" if job.state is S.PREFILLING else "decode"
                self._metrics.retries.labels(phase=phase).inc()
                budget = self._settings.max_prefill_retries if phase == "prefill" else self._settings.max_decode_retries
                if len(lost) > budget:
                    raise InstanceFailed(f"colocated instance(s) failed {len(lost)} time(s): {exc}") from None
                log.warning("colocated leg of %s lost on %s: %s; continuing elsewhere", job.request_id,
                            inst.instance_id, exc)


def _stop_if_final(job: Job, exc: InstanceError) -> None:
    """No retry when the request was reaped, or when an instance calls the request itself bad (any other
    instance would say the same): a 400."""
    if job.reaped:
        raise DeadlineExceeded("request deadline passed (reaped)") from None
    if exc.kind == TAG_BAD_REQUEST:
        raise BadRequest(f"an instance refused the request: {exc}") from None
