"""The accept-queue wait: read from the kernel for a real listening socket, charged to a new connection's
request (not to a keep-alive one), moved into the request's received stamp, and attached by the server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from router.accept_queue import MIN_RATE_SAMPLES, AcceptQueue, accept_queue_length
from router.received import RECEIVED_S, StampReceived
from router.serving import DrainingServer
from tests.unit.router.router_testkit import MODEL, FakeInstanceClient, make_router, register_pd

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="the accept queue is read on Linux")


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening socket nobody accepts on, and the clients connected to it (handshakes done by the kernel)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    clients: list[socket.socket] = []
    try:
        yield server, clients
    finally:
        for c in clients:
            c.close()
        server.close()


def connect(server: socket.socket, clients: list[socket.socket], n: int) -> None:
    for _ in range(n):
        c = socket.create_connection(server.getsockname())
        clients.append(c)


def test_the_kernel_reports_the_connections_waiting_to_be_accepted(listener) -> None:
    server, clients = listener
    assert accept_queue_length(server) == 0
    connect(server, clients, 5)
    assert accept_queue_length(server) == 5
    conn, _ = server.accept()
    try:
        assert accept_queue_length(server) == 4
        assert accept_queue_length(conn) is None  # an accepted connection is not a listener
    finally:
        conn.close()


def test_a_new_connection_waited_queue_length_over_the_accept_rate(listener) -> None:
    server, clients = listener
    now = [0.0]
    queue = AcceptQueue(clock=lambda: now[0])
    queue.listen_on([server])
    connect(server, clients, 5)  # 5 queued behind each request the router reads: they arrived meanwhile
    waits = []
    for k in range(10):  # accepted at 100 per second
        now[0] = k * 0.01
        waits.append(queue.wait_s(("10.0.0.1", 40000 + k)))
    assert waits[:MIN_RATE_SAMPLES - 1] == [0.0] * (MIN_RATE_SAMPLES - 1)  # too few accepts to tell a rate
    assert waits[MIN_RATE_SAMPLES - 1:] == pytest.approx([5 / 100] * (11 - MIN_RATE_SAMPLES))
    assert queue.last_wait_s == pytest.approx(0.05)


def test_a_burst_after_quiet_time_is_not_divided_by_the_quiet_rate(listener) -> None:
    """One accept a second with nobody queued, then a burst queues: the quiet second's rate would make the
    burst's first requests wait minutes; the rate is taken over the burst's own accepts instead."""
    server, clients = listener
    now = [0.0]
    queue = AcceptQueue(clock=lambda: now[0])
    queue.listen_on([server])
    for k in range(20):
        now[0] = k * 0.1
        assert queue.wait_s(("10.0.0.1", 30000 + k)) == 0.0  # nobody behind: no wait
    connect(server, clients, 50)
    waits = []
    for k in range(MIN_RATE_SAMPLES):  # the burst's accepts, 200 per second
        now[0] = 2.0 + k * 0.005
        waits.append(queue.wait_s(("10.0.0.2", 40000 + k)))
    assert max(waits) == pytest.approx(50 / 200)


def test_a_keep_alive_request_is_not_charged_again(listener) -> None:
    server, clients = listener
    now = [0.0]
    queue = AcceptQueue(clock=lambda: now[0])
    queue.listen_on([server])
    connect(server, clients, 2)
    for k in range(MIN_RATE_SAMPLES):
        now[0] = k * 0.1
        queue.wait_s(("10.0.0.1", 40000 + k))
    assert queue.wait_s(("10.0.0.1", 40001)) == 0.0  # came on a connection accepted earlier
    now[0] += 0.1
    assert queue.wait_s(("10.0.0.1", 40999)) == pytest.approx(2 * 0.1)


def test_without_a_listening_socket_nothing_is_charged(listener) -> None:
    server, clients = listener
    connect(server, clients, 3)
    detached = AcceptQueue()
    assert detached.wait_s(("10.0.0.1", 1)) == 0.0 and detached.length() == 0
    conn, _ = server.accept()
    try:
        attached_to_a_connection = AcceptQueue()
        attached_to_a_connection.listen_on([conn])  # not a listener: ignored
        assert attached_to_a_connection.length() == 0
    finally:
        conn.close()


async def test_the_received_stamp_moves_back_by_the_wait() -> None:
    class Waited(AcceptQueue):
        def wait_s(self, client):
            return 0.75 if client == ("10.0.0.1", 5) else 0.0

    seen: dict = {}

    async def app(scope, receive, send):
        seen.update(scope["state"])

    stamp = StampReceived(app, accept_queue=Waited())
    loop = asyncio.get_running_loop()
    before = loop.time()
    await stamp({"type": "http", "client": ["10.0.0.1", 5]}, None, None)  # ASGI servers may send a list
    assert seen[RECEIVED_S] == pytest.approx(before - 0.75, abs=0.05)
    await stamp({"type": "http", "client": ("10.0.0.1", 6)}, None, None)
    assert seen[RECEIVED_S] >= before


class ObservedServer(DrainingServer):
    """The router's server, with an event for the end of its start-up (uvicorn only sets a flag)."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config, app)
        self.up = asyncio.Event()

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets=sockets)
        self.up.set()


async def test_the_server_attaches_its_listening_socket(valkey_url, redis) -> None:
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient())
    server = ObservedServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"), app)
    serving = asyncio.create_task(server.serve())
    try:
        up = asyncio.create_task(server.up.wait())
        await asyncio.wait({up, serving}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert server.up.is_set(), "the router did not start"
        (sock,) = [s for srv in server.servers for s in srv.sockets]
        port = sock.getsockname()[1]
        assert app.state.router.accept_queue.length() == 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            ok = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
            scraped = (await http.get("/metrics")).text
        assert ok.status_code == 200
        assert "trtd_router_accept_queue_connections 0.0" in scraped
        assert "trtd_router_accept_wait_seconds" in scraped
    finally:
        server.should_exit = True
        await serving
