"""How many of the clients the router refused come back for the places it gave them, measured.

A 429's Retry-After is the client's place among the clients refused before it (router/admission.py), and
those places are only worth holding for clients that return: OpenAI's SDKs retry a 429 by default, a script
with `max_retries=0`, curl or a load generator does not. Held for clients that never come back, the places
make every later client wait for work that is not there (on the tiny deployment at 4x overload: told 12-15 s
while the router admitted again within 31-160 ms). Clients that do not say their retry count take no place at
all (admission.py); among the SDK's, which all say it, the router cannot know which will retry, but it sees
the whole: a request that says it is a retry (`x-stainless-retry-count`) claims the oldest place still open,
and a place nobody claimed by RETURN_GRACE_S after it fell due settles as not claimed. The share of claimed
places among the latest RETURN_MEMORY that settled weights every place (admission.py scales its queue by it).

Time here is arrival time (when the request reached the router's socket, router/received.py), not the time
the router got to it: under overload a returning client waits in the accept queue for up to a second or two,
and judged by the processing clock its place would expire while it waited. Requests are processed in arrival
order, so the latest arrival processed is the clock that says which places have been passed by.

Before any place has settled the share is 1 (the SDKs retry by default); the first clients that do not come
back bring it down within a second of their places falling due."""

from __future__ import annotations

from collections import deque

RETURN_GRACE_S = 1.0  # an SDK sleeps exactly `retry-after-ms`, then opens a connection: back within this
# settled places the share is measured over: a third of a second of refusals at 4x overload on the tiny
# deployment, so that clients of another kind move it within their first dozens of places
RETURN_MEMORY = 30
PRIOR_RETURNED, PRIOR_SETTLED = 1, 1  # the share before evidence: clients come back


class Returns:
    """Places handed out to refused clients, claimed by their retries or settled unclaimed."""

    def __init__(self) -> None:
        self._open: deque[float] = deque()  # when each unclaimed place falls due, in the order handed out
        self._settled: deque[bool] = deque(maxlen=RETURN_MEMORY)  # True: its client came back
        self._returned = 0  # True in _settled
        self._latest_arrival_s = float("-inf")

    def handed_out(self, due_at_s: float) -> None:
        """A refused client was told to come back at `due_at_s`."""
        self._open.append(due_at_s)

    def arrived(self, at_s: float, retry: bool) -> None:
        """A request reached the router at `at_s` (arrival time); `retry`: it says it was sent before. A retry
        claims the oldest open place: which client it is the router cannot tell, and one that ignored its
        Retry-After still came back."""
        self._latest_arrival_s = max(self._latest_arrival_s, at_s)
        self._expire()
        if retry and self._open:
            self._open.popleft()
            self._settle(True)

    def _expire(self) -> None:
        passed_s = self._latest_arrival_s - RETURN_GRACE_S
        while self._open and self._open[0] < passed_s:
            self._open.popleft()
            self._settle(False)

    def _settle(self, returned: bool) -> None:
        if len(self._settled) == RETURN_MEMORY:
            self._returned -= self._settled[0]  # about to fall out of the memory
        self._settled.append(returned)
        self._returned += returned

    def share(self) -> float:
        """The share of refused clients that come back for their places (> 0: one may yet)."""
        return (self._returned + PRIOR_RETURNED) / (len(self._settled) + PRIOR_SETTLED)
