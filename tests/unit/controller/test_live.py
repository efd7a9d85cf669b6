"""The live loop against a real Valkey: decisions are recorded in the stream with their reason."""

from __future__ import annotations

import json

from tests.unit.controller.test_policy import CapacityPredictor
from tests.unit.router.router_testkit import redis, valkey_url  # noqa: F401  (pytest fixtures)
from trt_disagg.controller.actuator import DryRunActuator
from trt_disagg.controller.live import ControllerLoop, LoopSettings
from trt_disagg.controller.policy import Action, Budget, Controller, ControllerConfig, Shape
from trt_disagg.keys import autoscale_decisions_key


async def test_a_dry_run_step_records_its_decision(redis):  # noqa: F811
    controller = Controller(ControllerConfig(interval_s=1.0, window_s=10.0), Budget(3), CapacityPredictor(1, 1))
    loop = ControllerLoop(redis, controller, DryRunActuator(Shape(1, 1)), LoopSettings(dry_run=True),
                          clock=lambda: 1e9)
    decision = await loop.step()
    assert decision.action is Action.NONE and "too little to decide on" in decision.reason
    (_, fields), = await redis.xrange(autoscale_decisions_key())
    recorded = json.loads(fields[b"d"] if b"d" in fields else fields["d"])
    assert recorded["reason"] == decision.reason and recorded["shape"] == "0P0D"
