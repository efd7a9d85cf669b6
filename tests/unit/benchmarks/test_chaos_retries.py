"""benchmarks/chaos_retries.py: what a 429's Retry-After is measured against when clients come back, and the
summary of clients that retry as openai-python does."""

from __future__ import annotations

import pytest

from benchmarks.chaos_client import Outcome
from benchmarks.chaos_retries import (
    Client,
    drains_of_work_ahead,
    drains_of_work_ahead_as_served,
    retry_summary,
)


def served(sent_at: float, ttft_s: float) -> Outcome:
    return Outcome("retrying burst", "ok", ttft_s=ttft_s, sent_at=sent_at, answered_at=sent_at + ttft_s)


def refused(sent_at: float, retry_after_s: float) -> Outcome:
    return Outcome("retrying burst", "clear error", "HTTP 429", retry_after_s=retry_after_s,
                   retry_after_header_s=1, sent_at=sent_at, answered_at=sent_at + 0.01)


def test_a_429_is_measured_against_the_first_tokens_of_the_clients_that_began_before_it():
    first = Client(0.0, [served(0.0, 1.0)])  # first token at 1.0
    second = Client(0.1, [refused(0.1, 2.0), served(2.11, 0.5)])  # refused at 0.11; first token at 2.61
    third = Client(0.2, [refused(0.2, 0.5), refused(0.71, 3.0), served(3.72, 0.2)])  # first token at 3.92
    gone = Client(0.3, [refused(0.3, 1.0), refused(1.31, 1.0), refused(2.32, 1.0)])  # never served: ahead of none
    late = Client(5.0, [refused(5.0, 0.05)])  # everyone ahead served before its 429
    pairs = drains_of_work_ahead([late, gone, third, second, first])
    assert [x for pair in pairs for x in pair] == pytest.approx([x for pair in [
        (2.0, 1.0 - 0.11),  # second: behind the first
        (0.5, 2.61 - 0.21), (3.0, 2.61 - 0.72),  # third: behind the first two
        (1.0, 3.92 - 0.31), (1.0, 3.92 - 1.32), (1.0, 3.92 - 2.33),  # behind the three served
        (0.05, 0.0),
    ] for x in pair])
    summary = retry_summary([first, second, third, gone, late], rate_rps=1.0, target_s=2.0, capacity_rps=0.25)
    assert summary["clients"] == 5 and summary["attempts"] == 10 and summary["served"] == 3
    assert summary["served_by_attempt"] == [1, 1, 1]
    assert summary["gave_up_after_429s"] == 2 and summary["other_failures"] == 0
    assert summary["retries"] == 5 and summary["retries_admitted"] == 2
    # within 2x (or 0.1 s): 3.0 vs 1.89, 1.0 vs 1.59 and 0.05 vs 0; 2.0 vs 0.89 is past 2x, the rest under half
    assert summary["announced_within_2x_of_work_ahead"] == pytest.approx(3 / 7)
    assert summary["served_rps_over_run"] == pytest.approx(3 / 3.92)  # 3 served from 0 to the last first token
    assert summary["caller_ttft_p50_s"] == pytest.approx(2.61 - 0.1)  # the second caller, from its first send


def test_as_served_a_client_ahead_reached_late_does_not_stretch_the_drain_behind_it():
    early = Client(0.0, [refused(0.0, 1.0), served(1.01, 9.0)])  # refused, back at 1.01, first token at 10.01
    behind = Client(0.1, [refused(0.1, 1.0), served(1.11, 0.4)])  # refused at 0.11; first token at 1.51
    jumper = Client(0.5, [served(0.5, 0.5)])  # a new arrival: first token at 1.0
    clients = [early, behind, jumper]
    # behind's 429: one client ahead (early). Every client ahead served: 10.01; as much work served: 1.0 (jumper's)
    assert drains_of_work_ahead(clients)[1] == pytest.approx((1.0, 10.01 - 0.11))
    assert drains_of_work_ahead_as_served(clients)[1] == pytest.approx((1.0, 1.0 - 0.11))
    assert drains_of_work_ahead_as_served(clients)[0] == pytest.approx((1.0, 0.0))  # nobody ahead of early
