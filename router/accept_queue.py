"""How long a new connection waited in the kernel's accept queue before the router read its request.

Under overload the router's event loop accepts connections in batches between its other work; meanwhile
they wait, request bytes and all, in the listening socket's accept queue. Measured on 2 cores at 4x
overload (benchmarks/chaos.py --only overload): 80-150 connections queued through most of the burst, and
0.3-0.9 s at p50 (0.9-1.4 s at p90) from the client's write to the router's first look at the request,
while the router then took 1-2 ms to admission. That wait is part of the client's time to first token, yet
it ends before anything in the request can be stamped (router/received.py), so admission would count a
request as fresh when most of its TTFT budget is already gone.

The kernel knows the queue's length: for a listening socket Linux's TCP_INFO reports it as tcpi_unacked
(sk_ack_backlog; tcpi_sacked is the backlog limit), what `ss -ltn` shows as Recv-Q. The connections still
queued when one is accepted are those that arrived while it waited, so its wait is about queue length /
arrival rate (Little's law over the queue), with the rate of the connections the router accepted since
the queue was last seen empty (while the queue grows that rate is below the arrivals': the estimate errs
long, towards refusing). The queue is read when the request reaches the app, a little after its
connection was accepted (the app does not see the accept itself): connections accepted together and read
one after another are charged the queue as it has refilled by then, which errs short. Measured at 4x
overload, the wait left uncounted (client write to the moved stamp) was 0.01 s at p50 and 0.11 s at p90,
against 0.3-0.9 s and 0.9-1.4 s with the router counting from its own stamp; admitted TTFT p90 1.59-1.88 s
against a 2 s target in four runs, against 1.87-3.18 s in seven.

Only a request on a new connection went through the accept queue. A keep-alive client's later requests
come on a connection already accepted (their wait for the loop is one iteration, not a queue), so a
client address seen lately is not charged again. Elsewhere than Linux (no TCP_INFO), or with no listening
socket attached (a test app without a server), the wait is 0: the router counts from its own stamp.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

TCP_LISTEN = 10  # tcp_info.tcpi_state of a listening socket
_TCP_INFO_BYTES = 104  # enough of struct tcp_info for the fields read here
# struct tcp_info: eight one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked
_STATE_OFFSET, _UNACKED_OFFSET = 0, 24
RATE_WINDOW_S = 2.0  # accepted connections of the last RATE_WINDOW_S give the arrival rate
MAX_RATE_SAMPLES = 512
# Fewer accepts than this since the queue was last empty: no rate yet, no charge. The rate is taken over the
# current busy period only: a burst after quiet time would otherwise be divided by the quiet time's rate
# (one accept a second, 100 queued: 100 s) and refused whole with a Retry-After of minutes.
MIN_RATE_SAMPLES = 8
REMEMBERED_CLIENTS = 8192  # client addresses whose connection counts as accepted already (keep-alive)


def accept_queue_length(sock: Any) -> int | None:
    """Connections waiting in `sock`'s accept queue; None when it is not a listening TCP socket on Linux."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_BYTES)
    except OSError:
        return None
    if len(raw) < _UNACKED_OFFSET + 4 or raw[_STATE_OFFSET] != TCP_LISTEN:
        return None
    return int(struct.unpack_from("I", raw, _UNACKED_OFFSET)[0])


class AcceptQueue:
    """The listening sockets of one router and the connections it accepted lately."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sockets: list[Any] = []
        self._accepted: deque[float] = deque(maxlen=MAX_RATE_SAMPLES)
        self._clients: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.last_wait_s = 0.0  # the latest estimate, for /metrics

    def listen_on(self, sockets: Iterable[Any]) -> None:
        """The server's listening sockets (uvicorn's, once it has started)."""
        self._sockets = [s for s in sockets if accept_queue_length(s) is not None]

    def length(self) -> int:
        """Connections waiting to be accepted now, over all listening sockets."""
        return sum(n for s in self._sockets if (n := accept_queue_length(s)) is not None)

    def wait_s(self, client: tuple[Any, ...] | None) -> float:
        """Estimated seconds the request just read from `client` (host, port) waited to be accepted: 0 on a
        connection accepted earlier (keep-alive), else queue length / the rate of recent accepts."""
        if not self._sockets:
            return 0.0
        if client is not None:
            if client in self._clients:
                self._clients.move_to_end(client)
                return 0.0
            self._clients[client] = None
            if len(self._clients) > REMEMBERED_CLIENTS:
                self._clients.popitem(last=False)
        queued = self.length()
        accepted = self._accepted
        if not queued:  # nobody behind it: it did not wait, and the next queue is a new busy period
            accepted.clear()
            self.last_wait_s = 0.0
            return 0.0
        now = self._clock()
        accepted.append(now)
        while accepted[0] < now - RATE_WINDOW_S:
            accepted.popleft()
        span_s = accepted[-1] - accepted[0]
        if len(accepted) < MIN_RATE_SAMPLES or span_s <= 0:
            self.last_wait_s = 0.0
        else:
            self.last_wait_s = queued * span_s / (len(accepted) - 1)
        return self.last_wait_s
