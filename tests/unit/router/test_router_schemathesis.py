"""A bounded schemathesis run over the router's own OpenAPI schema (every check), fake instances behind it:
what the schema says is accepted is accepted, what it says is refused is refused with an OpenAI-shaped
4xx, and no request is a 500. Bounded (a few examples per operation) so it stays a unit test.

The router runs in its own thread (uvicorn, its own event loop), so schemathesis' synchronous calls can
reach it; `model` is an enum of the served model in the schema, so the generated requests reach the
(fake) instances instead of stopping at a 404.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.router.router_testkit import FakeInstanceClient, make_router, register_pd, serve, valkey_url  # noqa: F401

MAX_EXAMPLES = 10
MAX_INPUT_LEN, MAX_SEQ_LEN = 256, 512
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def router_url(valkey_url: str) -> Iterator[str]:  # noqa: F811
    started, stop = threading.Event(), threading.Event()
    box: dict[str, str] = {}

    async def run() -> None:
        import redis.asyncio as aioredis

        client = aioredis.from_url(valkey_url)
        await client.flushdb()
        await register_pd(client)
        await client.aclose()
        async with serve(make_router(valkey_url, FakeInstanceClient(), max_input_len=MAX_INPUT_LEN,
                                     max_seq_len=MAX_SEQ_LEN)) as url:
            box["url"] = url
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)  # this thread's loop serves until the module is done

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    assert started.wait(60), "the router did not start"
    yield box["url"]
    stop.set()
    thread.join(30)


def test_the_api_keeps_the_promises_of_its_schema(router_url: str) -> None:
    """`schemathesis run --checks all`, deterministic and bounded; 0 failures.

    The cross-field rules JSON Schema cannot state (min_tokens against max_tokens, the tokenized prompt
    against max_input_len and, with max_tokens, against max_seq_len) are applied by the hook module to
    the positive cases it generates (tests/unit/router/schemathesis_hooks.py says why).
    """
    cli = Path(sys.executable).parent / "schemathesis"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.unit.router.schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TRTD_SCHEMATHESIS_MAX_INPUT_LEN": str(MAX_INPUT_LEN), "TRTD_SCHEMATHESIS_MAX_SEQ_LEN": str(MAX_SEQ_LEN)}
    done = subprocess.run([str(cli), "run", f"{router_url}/openapi.json", "--checks", "all",
                           "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
                           "--include-path-regex", "^/(v1|metrics|health)", "--phases", "examples,coverage,fuzzing",
                           "--output-sanitize", "false", "--no-color"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
