"""Bad input gets a 4xx with an OpenAI-shaped error body naming the field; never a 500."""

from __future__ import annotations

import pytest

from tests.unit.router.router_testkit import MODEL, FakeInstanceClient, asgi_client, make_router, register_pd
from trt_disagg.keys import record_key

GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def assert_error_body(body: dict, status: int) -> dict:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and "/work" not in err["message"]
    return err


CASES = [
    # (path, body or raw bytes, status, param the message must name)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3}, 400, "model"),
    ("/v1/completions", {"model": MODEL, "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "prompt": "x" * 65}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 2, 100000]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("/v1/completions", {**GOOD, "temperature": 1e9}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "top_p": 7}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "top_k": -1}, 400, "top_k"),
    ("/v1/completions", {**GOOD, "n": 3}, 400, "n"),
    ("/v1/completions", {**GOOD, "stream": "perhaps"}, 400, "stream"),
    ("/v1/completions", {**GOOD, "echo": True}, 400, "echo"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 80}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("path, body, status, param", CASES)
async def test_bad_input_is_4xx_with_openai_error_body(valkey_url, redis, path, body, status, param):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient())
    async with asgi_client(app) as http:
        if isinstance(body, bytes):
            resp = await http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            resp = await http.post(path, json=body)
    assert resp.status_code == status, resp.text
    err = assert_error_body(resp.json(), status)
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)
        assert param in err["message"]
    assert not await redis.keys(record_key("*"))  # rejected before a record was made


async def test_unknown_route_and_method_are_openai_shaped(valkey_url, redis):
    app = make_router(valkey_url, FakeInstanceClient())
    async with asgi_client(app) as http:
        missing = await http.get("/v1/nothing")
        wrong = await http.get("/v1/completions")
        unknown_request = await http.get("/v1/requests/cmpl-unknown")
    assert missing.status_code == 404 and assert_error_body(missing.json(), 404)
    assert wrong.status_code == 405 and assert_error_body(wrong.json(), 405)
    assert unknown_request.status_code == 404
    assert assert_error_body(unknown_request.json(), 404)["code"] == "not_found"


async def test_no_instance_is_503(valkey_url, redis):
    app = make_router(valkey_url, FakeInstanceClient())
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json=GOOD)
    assert resp.status_code == 503
    assert assert_error_body(resp.json(), 503)["code"] == "instance_unavailable"
