"""The share of refused clients that come back for their places: claimed by retries, settled unclaimed once
passed by, on the arrival clock."""

from __future__ import annotations

import pytest

from router.returns import RETURN_GRACE_S, RETURN_MEMORY, Returns


def test_before_any_place_settles_clients_are_taken_to_come_back():
    returns = Returns()
    assert returns.share() == 1.0
    returns.handed_out(5.0)
    returns.arrived(5.0 + RETURN_GRACE_S, retry=False)  # due, but not yet passed by
    assert returns.share() == 1.0


def test_places_passed_by_unclaimed_bring_the_share_down_and_retries_claim_the_oldest():
    returns = Returns()
    for due in (1.0, 2.0, 3.0, 4.0):
        returns.handed_out(due)
    returns.arrived(2.1, retry=True)  # claims the place due at 1.0 (the router cannot tell whose it is)
    returns.arrived(3.5, retry=False)  # passes the place due at 2.0 by more than the grace: nobody came
    assert returns.share() == pytest.approx((1 + 1) / (2 + 1))  # one of two, and the prior's one of one
    # a retry that reached the socket at 3.9 but waited in the accept queue is judged by when it arrived: the
    # place due at 3.0 is still open for it
    returns.arrived(3.9, retry=True)
    returns.arrived(10.0, retry=False)  # the place due at 4.0 passes unclaimed
    assert returns.share() == pytest.approx((2 + 1) / (4 + 1))


def test_the_share_follows_the_latest_places_only():
    returns = Returns()
    for i in range(RETURN_MEMORY):  # a burst of clients that come back
        returns.handed_out(float(i))
        returns.arrived(float(i), retry=True)
    assert returns.share() == 1.0
    for i in range(RETURN_MEMORY):  # then clients that never do
        returns.handed_out(1000.0 + i)
    returns.arrived(2000.0, retry=False)
    assert returns.share() == pytest.approx(1 / (RETURN_MEMORY + 1))
