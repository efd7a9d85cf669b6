"""KV handles: a round trip works; forged, tampered, truncated, foreign and expired handles are refused."""

from __future__ import annotations

import time

import pytest

from trt_disagg.contract import KVLayout
from trt_disagg.kv.errors import HandleExpiredError, HandleForgedError, InvalidHandleError
from trt_disagg.kv.handle import (
    SECRET_ENV,
    KVHandle,
    decode_handle,
    encode_handle,
    new_secret,
    secret_from_env,
)

LAYOUT = KVLayout(fingerprint="fp", num_layers=4, num_kv_heads=4, head_dim=16, dtype="float32",
                  tokens_per_block=16, tp=2, pp=1)


def make_handle(expires_in_s: float = 60.0) -> KVHandle:
    return KVHandle(request_id="req-1", source_instance="prefill-0", kv_url="tcp://127.0.0.1:5000",
                    source_host="h/1", layout=LAYOUT, num_tokens=33, first_token=7,
                    expires_at=time.time() + expires_in_s, block_ids=(3, 4, 5))


def test_round_trip_keeps_every_field():
    secret = new_secret()
    handle = make_handle()
    blob = encode_handle(handle, secret)
    assert blob[:4] == b"TDKV"
    assert len(blob) < 1024  # small enough to ride in every response
    assert decode_handle(blob, secret) == handle


@pytest.mark.parametrize("position", [0, 5, 40, -1])
def test_any_flipped_byte_is_refused(position):
    secret = new_secret()
    blob = bytearray(encode_handle(make_handle(), secret))
    blob[position] ^= 0x01
    with pytest.raises(HandleForgedError):
        decode_handle(bytes(blob), secret)


def test_handle_of_another_deployment_is_refused():
    blob = encode_handle(make_handle(), new_secret())
    with pytest.raises(HandleForgedError, match="signature mismatch"):
        decode_handle(blob, new_secret())


def test_forged_payload_without_secret_is_refused():
    secret = new_secret()
    blob = encode_handle(make_handle(), secret)
    forged = blob.replace(b"req-1", b"req-2")  # someone else's request id, old tag
    with pytest.raises(HandleForgedError):
        decode_handle(forged, secret)


@pytest.mark.parametrize("blob", [b"", b"TDKV", b"garbage" * 20, b"\x00" * 100])
def test_junk_is_refused_as_invalid_handle(blob):
    with pytest.raises(InvalidHandleError):
        decode_handle(blob, new_secret())


def test_truncated_handle_is_refused():
    secret = new_secret()
    blob = encode_handle(make_handle(), secret)
    with pytest.raises(HandleForgedError, match="length"):
        decode_handle(blob[:-40] + blob[-32:], secret)


def test_expired_handle_is_refused_with_its_age():
    secret = new_secret()
    blob = encode_handle(make_handle(expires_in_s=10.0), secret)
    with pytest.raises(HandleExpiredError, match="req-1 expired"):
        decode_handle(blob, secret, now=time.time() + 20.0)
    assert decode_handle(blob, secret).request_id == "req-1"


def test_secret_from_env(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert secret_from_env() is None
    monkeypatch.setenv(SECRET_ENV, "ab" * 32)
    assert secret_from_env() == bytes.fromhex("ab" * 32)
    monkeypatch.setenv(SECRET_ENV, "not-hex")
    with pytest.raises(ValueError, match=SECRET_ENV):
        secret_from_env()
