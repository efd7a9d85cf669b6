"""What one Triton instance does with requests: the logic behind the thin Python-backend `model.py`.

    execute() ──submit()──▶ prefill / colocated: engine.add_request
                           decode: verify handle ─▶ fetch pool: pull KV ─▶ engine.add_decode_request
    loop thread: cancelled? ─▶ engine.abort │ engine.step() ─▶ TokenEvents ─▶ Responder.send
                 PREFILL_DONE ─▶ sender.offer(): the KV stays until a decode instance pulls it or it expires

Responses (decoupled): prefill sends one response (output_ids=[first token], context_phase_params=handle)
with the final flag; decode and colocated stream one token per response when `streaming`, else one
response with every token. Failures are sent as an error response whose message starts with a
contract.ErrorKind tag ("invalid_handle: ...") so the router can map it without parsing prose.
Importable and testable without Triton: the model passes a `Responder` for each request.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trt_disagg.contract import ErrorKind, InstanceLoad, RequestType, Role, SamplingParams
from trt_disagg.engine.types import FinishReason, TokenEvent
from trt_disagg.engine_dir import EngineConfig
from trt_disagg.exported_kv import ExportedKV
from trt_disagg.kv.errors import InvalidHandleError, KVTransferError
from trt_disagg.kv.handle import KVHandle, decode_handle, encode_handle
from trt_disagg.kv.transport import (
    KVSender,
    check_layout,
    drop_receive_caches,
    make_receiver,
    resolve_receiver_name,
)
from trt_disagg.triton.tensors import InstanceRequest

log = logging.getLogger(__name__)

ROLE_ACCEPTS: dict[Role, frozenset[RequestType]] = {
    Role.PREFILL: frozenset({RequestType.CONTEXT_ONLY}),
    # context_and_generation on a decode instance: the router's local prefill of a short suffix, when this
    # instance already holds the rest of the prompt in its prefix cache (no prefill instance, no transfer).
    Role.DECODE: frozenset({RequestType.GENERATION_ONLY, RequestType.CONTEXT_AND_GENERATION}),
    Role.COLOCATED: frozenset({RequestType.CONTEXT_AND_GENERATION}),
}


class Engine(Protocol):
    """What an instance drives: the torch engine (engine.llm_engine.LLMEngine) or the fake one
    (triton.fake_engine.FakeEngine, the test double), both checked against this by `adapter.load_engine`.

    Ownership: `add_request` / `add_decode_request` hand the request (and the imported KV) to the engine,
    which owns its blocks until the request finishes or is aborted. A context_only request's KV is then
    held for the hand-off until `release_kv`; `export_kv` only reads it. `abort` and `release_kv` are
    idempotent. `step` is called from one thread; the other methods may come from any thread.
    """

    @property
    def config(self) -> EngineConfig: ...
    @property
    def kv_capacity_tokens(self) -> int: ...
    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                    request_type: RequestType = RequestType.CONTEXT_AND_GENERATION) -> None: ...
    def add_decode_request(self, request_id: str, prompt_ids: list[int], first_token: int, kv: ExportedKV,
                           sampling: SamplingParams) -> None: ...
    def step(self) -> list[TokenEvent]: ...
    def has_unfinished(self) -> bool: ...
    def abort(self, request_id: str) -> None: ...
    def export_kv(self, request_id: str) -> ExportedKV: ...
    def release_kv(self, request_id: str) -> None: ...
    def load(self) -> InstanceLoad: ...
    def failure(self) -> str | None: ...  # why it cannot serve (a rank process died), None while it can
    def shutdown(self) -> None: ...


class Responder(Protocol):
    """One request's response channel (Triton's response sender in production)."""

    def send(self, token_ids: list[int], context_phase_params: bytes | None, final: bool) -> None: ...
    def send_error(self, kind: ErrorKind, message: str) -> None: ...  # always final
    def is_cancelled(self) -> bool: ...


@dataclass
class _Stream:
    engine_id: str
    request: InstanceRequest
    responder: Responder
    pending_tokens: list[int] = field(default_factory=list)  # non-streaming: sent at the end
    handoff: dict[str, float] | None = None  # generation_only: perf_counter marks until its first token


class InstanceServer:
    """Drives one engine for one Triton model (role). Thread-safe `submit`; one loop thread."""

    def __init__(self, role: Role, engine: Engine, secret: bytes, sender: KVSender | None = None,
                 transport: str = "auto", receiver_options: dict | None = None,
                 fetch_workers: int = 4, idle_poll_s: float = 0.02, iteration_log: Path | None = None) -> None:
        if role is Role.PREFILL and sender is None:
            raise ValueError("a prefill instance needs a KV sender")
        self.role = role
        self.engine = engine
        self._secret = secret
        self._sender = sender
        self._transport = transport
        self._receiver_options = receiver_options or {}
        self._idle_poll_s = idle_poll_s
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._fetch_pool = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="kv-fetch")
        self._thread: threading.Thread | None = None
        self._broken: str | None = None  # set once by `fail_engine`: no engine call is made after it
        self._load = engine.load()
        self._step_marks = (0.0, 0.0)  # perf_counter at the start and end of the latest step
        # One JSON line per engine step (wall start, kind, batch, tokens, context, duration): TensorRT-LLM's
        # iteration stats, so a benchmark can set served step times next to profiled ones.
        self._iteration_log = open(iteration_log, "a", buffering=1) if iteration_log else None  # noqa: SIM115

    # ---- lifecycle ----
    def start(self) -> None:
        if self._sender is not None:
            self._sender.start()
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{self.role}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Fail what is in flight, stop the loop and the KV server, shut the engine down. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._fetch_pool.shutdown(wait=True, cancel_futures=True)
        drop_receive_caches()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            self.engine.abort(s.engine_id)
            _safe(s.responder.send_error, ErrorKind.SHUTTING_DOWN, "the instance is shutting down")
        if self._sender is not None:
            self._sender.close()
        if self._iteration_log is not None:
            self._iteration_log.close()
        self.engine.shutdown()

    def fail_engine(self, reason: str) -> None:
        """The engine is gone (a rank died): fail every request held here with an error that says so (the
        router retries those elsewhere), refuse new ones, and stop calling the engine. Idempotent."""
        if self._broken is not None:
            return
        self._broken = reason
        self._wake.set()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            _safe(s.responder.send_error, ErrorKind.INTERNAL, f"the engine of this instance failed ({reason})")

    def load(self) -> InstanceLoad:
        """Latest load (refreshed by the loop after every step; never waits for the engine)."""
        load = self._load
        if self._sender is not None:
            load.pending_kv_handoffs = self._sender.num_pending()
        return load

    # ---- requests in ----
    def submit(self, req: InstanceRequest, responder: Responder) -> None:
        """Accept one request; every outcome, errors included, goes to `responder`."""
        if req.request_type not in ROLE_ACCEPTS[self.role]:
            return responder.send_error(ErrorKind.BAD_REQUEST, f"this is a {self.role} instance: request_type "
                                        f"{req.request_type} is not served here")
        if self._broken is not None:
            return responder.send_error(ErrorKind.INTERNAL, f"the engine of this instance failed ({self._broken})")
        engine_id = f"{req.request_id or 'req'}#{next(self._ids)}"
        stream = _Stream(engine_id, req, responder)
        if req.request_type is RequestType.GENERATION_ONLY:
            return self._submit_decode(stream)
        if self._sender is not None and not self._sender.can_admit(len(req.prompt_ids)):
            return responder.send_error(ErrorKind.OVERLOADED, f"{self._sender.pending_tokens()} tokens of KV "
                                        "wait to be pulled; retry later or on another prefill instance")
        with self._lock:
            self._streams[engine_id] = stream
        try:
            self.engine.add_request(engine_id, req.prompt_ids, req.sampling, req.request_type)
        except ValueError as exc:  # EngineInputError: too long, bad sampling, ...
            self._drop(engine_id)
            return responder.send_error(ErrorKind.BAD_REQUEST, str(exc))
        self._wake.set()

    def _submit_decode(self, stream: _Stream) -> None:
        stream.handoff = {"received": time.perf_counter()}
        req = stream.request
        if not req.context_phase_params:
            return stream.responder.send_error(ErrorKind.BAD_REQUEST, "generation_only needs the "
                                               "context_phase_params of a prefill response")
        try:
            handle = decode_handle(req.context_phase_params, self._secret)
            check_layout(handle, self.engine.config.kv_layout())
            if handle.num_tokens != len(req.prompt_ids):
                raise InvalidHandleError(f"handle of request {handle.request_id} covers {handle.num_tokens} "
                                         f"tokens but input_ids has {len(req.prompt_ids)}")
        except InvalidHandleError as exc:
            return stream.responder.send_error(ErrorKind.INVALID_HANDLE, str(exc))
        except KVTransferError as exc:
            return stream.responder.send_error(ErrorKind.KV_TRANSFER_FAILED, str(exc))
        with self._lock:
            self._streams[stream.engine_id] = stream
        self._fetch_pool.submit(self._pull_and_admit, stream, handle)

    def _pull_and_admit(self, stream: _Stream, handle: KVHandle) -> None:
        """Fetch-pool thread: pull the KV, then hand the request to the engine (or fail it)."""
        req = stream.request
        marks = stream.handoff if stream.handoff is not None else {}
        marks["fetch_start"] = time.perf_counter()
        try:
            name = resolve_receiver_name(self._transport, handle)
            receiver = make_receiver(name, secret=self._secret, **self._receiver_options)
            kv = receiver.fetch(handle)
        except InvalidHandleError as exc:
            return self._fail(stream, ErrorKind.INVALID_HANDLE, str(exc))
        except KVTransferError as exc:
            return self._fail(stream, ErrorKind.KV_TRANSFER_FAILED, str(exc))
        if _cancelled(stream.responder) or self._stop.is_set():
            return self._fail(stream, ErrorKind.CANCELLED, "cancelled while its KV was pulled")
        if req.sampling.max_new_tokens < 2 or self._is_end(handle.first_token, req):
            # The first token already ended it: the KV was pulled (so the source is free) and is dropped.
            if self._drop(stream.engine_id):
                _safe(stream.responder.send, [], None, True)
            return
        marks["fetched"] = time.perf_counter()
        timing = getattr(receiver, "last_timing", None)  # FetchTiming of the socket receivers
        if timing is not None:
            marks.update({k: v for k, v in asdict(timing).items() if k != "total_s"})
        try:
            self.engine.add_decode_request(stream.engine_id, req.prompt_ids, handle.first_token, kv,
                                           req.sampling)
        except ValueError as exc:
            return self._fail(stream, ErrorKind.BAD_REQUEST, str(exc))
        marks["admitted"] = time.perf_counter()
        self._wake.set()

    def _is_end(self, token: int, req: InstanceRequest) -> bool:
        end_id = req.sampling.end_id if req.sampling.end_id is not None else self.engine.config.shape.eos_token_id
        return not req.sampling.ignore_eos and end_id is not None and token == end_id

    # ---- the loop ----
    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._broken is not None:  # nothing left to drive; stop() ends the thread
                self._stop.wait()
                break
            self._reap_cancelled()
            if not self.engine.has_unfinished():
                self._load = self.engine.load()
                self._wake.wait(self._idle_poll_s)  # new work sets it; the timeout re-checks cancellations
                self._wake.clear()
                continue
            started = time.time()
            self._step_marks = (time.perf_counter(), 0.0)
            try:
                events = self.engine.step()
            except Exception as exc:  # a broken rank: fail everything in flight, keep serving errors
                log.exception("engine step failed")
                self._fail_all(ErrorKind.INTERNAL, f"engine step failed: {exc}")
                continue
            self._step_marks = (self._step_marks[0], time.perf_counter())
            for event in events:
                self._deliver(event)
            self._load = self.engine.load()
            self._log_iteration(started)

    def _log_iteration(self, started: float) -> None:
        stats = getattr(self.engine, "last_step", None)
        if self._iteration_log is None or stats is None:
            return
        self._iteration_log.write(json.dumps({"t": round(started, 6), **asdict(stats)}) + "\n")

    def _log_handoff(self, stream: _Stream) -> None:
        """One iteration-log line per hand-off, at its first decode token: where the time between the
        decode request's arrival and that token went (queued for a fetch thread, the pull's phases on both
        sides, waiting for the loop, importing into the pool, the step itself, sending the response)."""
        marks: dict[str, float] = stream.handoff if stream.handoff is not None else {}
        stream.handoff = None
        if self._iteration_log is None or "admitted" not in marks:
            return
        step_start, step_end = self._step_marks
        stats = getattr(self.engine, "last_step", None)
        import_s = float(getattr(stats, "import_s", 0.0))
        row: dict[str, str | int | float] = {"t": round(time.time(), 6), "kind": "handoff", "request_id": stream.request.request_id,
               "num_tokens": len(stream.request.prompt_ids),
               "fetch_wait_s": marks["fetch_start"] - marks["received"],
               "transfer_s": marks["fetched"] - marks["fetch_start"],
               **{k: marks[k] for k in ("connect_s", "meta_s", "data_s", "release_s", "source_export_s",
                                        "source_stage_s") if k in marks},
               "admit_s": marks["admitted"] - marks["fetched"],
               "loop_wait_s": max(0.0, step_start - marks["admitted"]),
               "import_s": import_s, "first_step_s": max(0.0, step_end - step_start - import_s),
               "send_s": time.perf_counter() - step_end, "total_s": time.perf_counter() - marks["received"]}
        self._iteration_log.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v
                                              for k, v in row.items()}) + "\n")

    def _deliver(self, event: TokenEvent) -> None:
        with self._lock:
            stream = self._streams.get(event.request_id)
        if stream is None:  # cancelled or failed meanwhile (maybe just before it reached the engine)
            self.engine.abort(event.request_id)
            self.engine.release_kv(event.request_id)
            return
        if event.finish_reason is FinishReason.ABORTED:
            return self._fail(stream, ErrorKind.CANCELLED, "aborted")
        if event.token_id is None:  # FAILED: this request's own sampling or grammar broke, not the engine
            return self._fail(stream, ErrorKind.BAD_REQUEST, f"sampling failed for this request: {event.error}")
        if event.finish_reason is FinishReason.PREFILL_DONE:
            return self._hand_off(stream, event.token_id)
        final = event.finished
        if final:
            self._drop(stream.engine_id)
        if stream.request.streaming:
            _safe(stream.responder.send, [event.token_id], None, final)
        else:
            stream.pending_tokens.append(event.token_id)
            if final:
                _safe(stream.responder.send, stream.pending_tokens, None, True)
        if stream.handoff is not None:
            self._log_handoff(stream)

    def _hand_off(self, stream: _Stream, first_token: int) -> None:
        assert self._sender is not None
        self._drop(stream.engine_id)
        handle = self._sender.offer(stream.engine_id, num_tokens=len(stream.request.prompt_ids),
                                    first_token=first_token)
        if not _safe(stream.responder.send, [first_token], encode_handle(handle, self._secret), True):
            self._sender.release(stream.engine_id)  # nobody will ever pull it

    def _reap_cancelled(self) -> None:
        with self._lock:
            cancelled = [s for s in self._streams.values() if _cancelled(s.responder)]
        for s in cancelled:
            self._fail(s, ErrorKind.CANCELLED, "cancelled by the client")

    def _fail(self, stream: _Stream, kind: ErrorKind, message: str) -> None:
        """Abort in the engine (frees its blocks) and send one final error, once per stream."""
        self.engine.abort(stream.engine_id)
        if self._drop(stream.engine_id):
            _safe(stream.responder.send_error, kind, message)

    def _fail_all(self, kind: ErrorKind, message: str) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            self._fail(s, kind, message)

    def _drop(self, engine_id: str) -> bool:
        """Forget a stream; False when it was already gone (failed or cancelled elsewhere)."""
        with self._lock:
            return self._streams.pop(engine_id, None) is not None


def _cancelled(responder: Responder) -> bool:
    try:
        return responder.is_cancelled()
    except Exception:
        return False


def _safe(fn: Any, *args: Any) -> bool:
    """Send to a client that may be gone; a failed send must not kill the loop."""
    try:
        fn(*args)
        return True
    except Exception as exc:
        log.info("response not delivered: %s", exc)
        return False
