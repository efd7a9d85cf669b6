"""Typed KV-transfer failures. Each names the request and, where known, the peer, so an operator can act.

    KVTransferError            any failure to move KV (base). The decode instance reports it to the router as
                               ErrorKind.KV_TRANSFER_FAILED (or INVALID_HANDLE): the router re-prefills on
                               another instance, and answers 502 kv_transfer_failed when none is left
      InvalidHandleError       the handle is not one this deployment issued
        HandleForgedError      HMAC mismatch, truncated or foreign blob
        HandleExpiredError     its expiry passed (the prefill side has released or will release the KV)
      LayoutMismatchError      the KV cannot be converted into the receiver's layout (other model / shape)
      SourceUnreachableError   the prefill instance's KV endpoint refused, reset or timed out
      KVNotFoundError          the prefill side no longer holds the request (pulled twice, released)

Across the KV pull protocol (kv/wire.py) a failure travels as {"op": "error", "kind": WireErrorKind, ...};
`WIRE_ERRORS` is the one table between a kind and its exception, read by both ends.
"""

from __future__ import annotations

import enum


class KVTransferError(Exception):
    """Moving the KV of a request from a prefill to a decode instance failed."""


class InvalidHandleError(KVTransferError):
    """`context_phase_params` is not a valid handle of this deployment."""


class HandleForgedError(InvalidHandleError):
    pass


class HandleExpiredError(InvalidHandleError):
    pass


class LayoutMismatchError(KVTransferError):
    pass


class SourceUnreachableError(KVTransferError):
    pass


class KVNotFoundError(KVTransferError):
    pass


class WireErrorKind(enum.StrEnum):
    """The `kind` of an error frame of the KV pull protocol: what the receiving side should raise."""

    FORGED = "forged"  # the handle is not one this instance issued (HMAC, truncated, other instance)
    EXPIRED = "expired"  # the handle's TTL passed
    NOT_FOUND = "not_found"  # this instance no longer holds the request's KV
    INTERNAL = "internal"  # anything else: a malformed request, or the sender failed mid-stream


# kind -> the exception the receiving side raises (its reverse, for the sending side, is `wire_kind_of`).
WIRE_ERRORS: dict[WireErrorKind, type[KVTransferError]] = {
    WireErrorKind.EXPIRED: HandleExpiredError,
    WireErrorKind.FORGED: HandleForgedError,
    WireErrorKind.NOT_FOUND: KVNotFoundError,
    WireErrorKind.INTERNAL: KVTransferError,
}


def wire_kind_of(exc: KVTransferError) -> WireErrorKind:
    """The kind a sender reports for `exc`. Any refused handle that has not merely expired is reported as
    forged: the peer learns only that this instance will never accept it."""
    if isinstance(exc, HandleExpiredError):
        return WireErrorKind.EXPIRED
    if isinstance(exc, InvalidHandleError):
        return WireErrorKind.FORGED
    if isinstance(exc, KVNotFoundError):
        return WireErrorKind.NOT_FOUND
    return WireErrorKind.INTERNAL


def error_from_wire(kind: object, message: str) -> KVTransferError:
    """The exception for an error frame; a kind this side does not know is a plain KVTransferError."""
    try:
        cls = WIRE_ERRORS[WireErrorKind(str(kind))]
    except ValueError:
        cls = KVTransferError
    return cls(message)
