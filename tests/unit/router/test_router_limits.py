"""Input limits before work: a body too large is refused before it is read, a prompt too long before it is
tokenized, and a long prompt is tokenized off the event loop."""

from __future__ import annotations

import threading

from router.app import create_app
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    FakeTokenizer,
    asgi_client,
    make_router,
    make_settings,
    register_pd,
)

GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


async def test_a_body_declared_too_large_gets_413_without_being_read(valkey_url, redis):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient(), max_body_bytes=4096)
    sent = 0

    async def body():  # a client that would upload 100 MB; the router must not read it
        nonlocal sent
        for _ in range(100):
            sent += 1
            yield b"x" * (1 << 20)

    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", content=body(),
                               headers={"Content-Length": str(100 << 20), "Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large" and "max_body_bytes" in resp.json()["error"]["message"]
    assert sent <= 1  # refused from the header, not after reading the body


async def test_a_chunked_body_is_cut_off_at_the_limit(valkey_url, redis):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient(), max_body_bytes=4096)
    sent = 0

    async def body():
        nonlocal sent
        for _ in range(1000):
            sent += 1
            yield b" " * 1024

    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", content=body(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert sent < 10  # reading stopped at the limit, not at the end of the upload


class CountingTokenizer(FakeTokenizer):
    def __init__(self) -> None:
        self.encoded_on: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.encoded_on.append(threading.get_ident())
        return super().encode(text)


async def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(valkey_url, redis):
    await register_pd(redis)
    tok = CountingTokenizer()
    app = create_app(make_settings(valkey_url, max_input_len=64, max_chars_per_token=4),
                     instance_client=FakeInstanceClient(), tokenizer=tok)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={**GOOD, "prompt": "x" * 257})
        chat = await http.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "y" * 300}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert resp.json()["error"]["param"] == "prompt" and "257 characters" in resp.json()["error"]["message"]
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert tok.encoded_on == []  # neither was tokenized


async def test_a_long_prompt_is_tokenized_off_the_event_loop(valkey_url, redis):
    await register_pd(redis)
    tok = CountingTokenizer()
    app = create_app(make_settings(valkey_url, max_input_len=8000, max_seq_len=8100),
                     instance_client=FakeInstanceClient(), tokenizer=tok)
    async with asgi_client(app) as http:
        short = await http.post("/v1/completions", json=GOOD)
        long = await http.post("/v1/completions", json={**GOOD, "prompt": "ab" * 3000})
    assert short.status_code == 200 and long.status_code == 200
    loop_thread = threading.get_ident()
    assert tok.encoded_on[0] == loop_thread and tok.encoded_on[1] != loop_thread


async def test_a_stop_string_too_long_is_a_400(valkey_url, redis):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient())
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={**GOOD, "stop": ["ok", "z" * 257]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stop"
