"""The decision rule on a fake clock, with a predictor whose answers the test sets."""

from __future__ import annotations

import numpy as np
import pytest

from trt_disagg.controller.observe import ObservedWorkload
from trt_disagg.controller.policy import Action, Budget, Controller, ControllerConfig, Shape
from trt_disagg.errors import UserError


class CapacityPredictor:
    """Attainment from capacity: a shape meets the load when n >= rate * prefill_cost and m >= rate * decode_cost."""

    def __init__(self, prefill_per_rps: float, decode_per_rps: float) -> None:
        self.prefill_per_rps = prefill_per_rps
        self.decode_per_rps = decode_per_rps

    def attainment(self, shape: Shape, observed: ObservedWorkload) -> float:
        need_p = observed.arrival_rps * self.prefill_per_rps
        need_d = observed.arrival_rps * self.decode_per_rps
        return float(min(1.0, shape.num_prefill / need_p, shape.num_decode / need_d))


def window(rate: float, n: int = 100, measured: float | None = None) -> ObservedWorkload:
    return ObservedWorkload(60.0, n, rate, np.full(n, 100), np.full(n, 100), None, None, measured)


def make(prefill_per_rps: float = 1.0, decode_per_rps: float = 1.0, max_instances: int = 3, cooldown_s: float = 60.0):
    config = ControllerConfig(interval_s=10.0, cooldown_s=cooldown_s, window_s=60.0, down_rate_headroom=1.0)
    return Controller(config, Budget(max_instances), CapacityPredictor(prefill_per_rps, decode_per_rps))


def test_a_shift_to_long_prompts_switches_a_decode_instance_to_prefill():
    c = make(prefill_per_rps=1.0, decode_per_rps=0.5)  # 2 req/s needs 2 prefill, 1 decode
    d = c.decide(0.0, Shape(1, 2), window(2.0))
    assert d.action is Action.DECODE_TO_PREFILL and d.next_shape == Shape(2, 1)
    assert d.predicted_before == pytest.approx(0.5) and d.predicted_after == pytest.approx(1.0)
    assert "SLOs at risk" in d.reason and d.observed["arrival_rps"] == 2.0


def test_one_change_per_cooldown_and_none_while_busy():
    c = make(prefill_per_rps=1.0, decode_per_rps=1.0, max_instances=6)  # 3 req/s needs 3P3D
    assert c.decide(0.0, Shape(1, 1), window(3.0)).action is not Action.NONE
    held = c.decide(30.0, Shape(2, 1), window(3.0))
    assert held.action is Action.NONE and "cooldown" in held.reason
    busy = c.decide(61.0, Shape(2, 1), window(3.0), busy=True)
    assert busy.action is Action.NONE and "in progress" in busy.reason
    assert c.decide(61.0, Shape(2, 1), window(3.0)).action is not Action.NONE


def test_wasted_capacity_is_given_back_one_instance_at_a_time():
    c = make(prefill_per_rps=1.0, decode_per_rps=1.0)
    d = c.decide(0.0, Shape(2, 1), window(0.5))
    assert d.action is Action.REMOVE_PREFILL and "capacity wasted" in d.reason


def test_at_risk_never_shrinks_and_too_few_requests_decide_nothing():
    c = make(prefill_per_rps=1.0, decode_per_rps=1.0)
    assert c.decide(0.0, Shape(1, 1), window(3.0, n=5)).action is Action.NONE
    d = c.decide(0.0, Shape(1, 2), window(0.5, measured=0.5))  # measured misses though predicted meets
    assert d.action not in (Action.REMOVE_PREFILL, Action.REMOVE_DECODE)


def test_a_stationary_load_near_a_boundary_changes_at_most_once_per_cooldown():
    c = make(prefill_per_rps=1.0, decode_per_rps=0.5, max_instances=6, cooldown_s=60.0)
    rng = np.random.default_rng(0)
    shape, changes = Shape(1, 1), []
    for k in range(200):  # 2000 s, a decision every 10 s, the rate jittering around 1.9 req/s
        now = 10.0 * k
        d = c.decide(now, shape, window(float(1.9 + rng.normal(0, 0.1))))
        if d.action is not Action.NONE:
            changes.append(now)
            shape = d.next_shape
    assert changes, "the load needs more than 1P1D"
    assert all(b - a >= 60.0 for a, b in zip(changes, changes[1:], strict=False))
    assert len(changes) <= 4  # it settles: grows to the shape it needs, then holds


def test_bad_budgets_and_configs_name_the_field():
    with pytest.raises(UserError, match="max_instances"):
        Budget(1)
    with pytest.raises(UserError, match="max_gpus"):
        Budget(4, prefill_gpus=4, decode_gpus=2, max_gpus=4)
    with pytest.raises(UserError, match="down_margin"):
        ControllerConfig(up_margin=0.1, down_margin=0.05)
    with pytest.raises(UserError, match="window_s"):
        ControllerConfig(interval_s=60.0, window_s=30.0)
