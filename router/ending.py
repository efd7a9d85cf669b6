"""How a request ends: its terminal state, what its record says about why, and the error a generator still
running for it raises. `RequestTable.end(job, ending)` is the one place a request ends; the record writer
keeps the ending beside the state it wrote."""

from __future__ import annotations

from dataclasses import dataclass

from router.errors import RouterError
from router.states import RequestState


@dataclass(frozen=True)
class Ending:
    """How a request ends: its terminal state, and what its record and the metrics say about why."""

    state: RequestState  # DONE | FAILED | CANCELLED
    finish_reason: str | None = None  # DONE: stop | length
    error: str | None = None  # FAILED / CANCELLED: the record's `error` field
    error_kind: str | None = None  # the trtd_router_errors{kind} label; None: not an error
    exc: RouterError | None = None  # FAILED: what a generator still running for the request raises

    @classmethod
    def done(cls, finish_reason: str) -> Ending:
        return cls(RequestState.DONE, finish_reason=finish_reason)

    @classmethod
    def failed(cls, exc: RouterError) -> Ending:
        return cls(RequestState.FAILED, error=f"{type(exc).__name__}: {exc.message}", error_kind=exc.code or exc.type,
                   exc=exc)

    @classmethod
    def internal(cls, exc: BaseException) -> Ending:
        return cls(RequestState.FAILED, error=f"internal: {type(exc).__name__}", error_kind="internal")

    @classmethod
    def cancelled(cls, reason: str) -> Ending:
        return cls(RequestState.CANCELLED, error=reason)

    def error_for_generator(self) -> RouterError:
        """The error for a request's generator that finds the request ended by someone else (the reaper, a
        draining router) while it waited on an instance."""
        return self.exc or RouterError(f"the request already ended ({self.state})")

    def fields(self) -> dict[str, str]:
        """What the terminal transition writes into the record besides the state."""
        out = {}
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason
        if self.error is not None:
            out["error"] = self.error
        return out
