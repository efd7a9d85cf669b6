"""Typed KV-transfer failures. Each names the request and, where known, the peer, so an operator can act.

    KVTransferError            any failure to move KV (base; the router maps it to 502 KVTransferFailed)
      InvalidHandleError       the handle is not one this deployment issued (router: 403 InvalidHandle)
        HandleForgedError      HMAC mismatch, truncated or foreign blob
        HandleExpiredError     its expiry passed (the prefill side has released or will release the KV)
      LayoutMismatchError      the KV cannot be converted into the receiver's layout (other model / shape)
      SourceUnreachableError   the prefill instance's KV endpoint refused, reset or timed out
      KVNotFoundError          the prefill side no longer holds the request (pulled twice, released)
"""

from __future__ import annotations


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
