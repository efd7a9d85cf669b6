"""The controller at scale: OPT-13B on 8 A100 (published fits), chat -> long documents -> chat."""

from __future__ import annotations

import numpy as np
import pytest

from trt_disagg.controller.compare import compare
from trt_disagg.controller.policy import Action, Budget, ControllerConfig, Shape
from trt_disagg.controller.predict import SLO
from trt_disagg.controller.simulated import Delays, SimulatedActuator
from trt_disagg.workload.phases import Diurnal, Phase, build_phased_trace, parse_phases


def test_simulated_actuator_delays_and_gpu_hours():
    act = SimulatedActuator(Shape(1, 1), Budget(4), Delays(startup_s=60.0, drain_s=30.0))
    act.apply(Action.ADD_PREFILL, 100.0)
    assert act.shape() == Shape(2, 1) and act.serving_at(150.0) == Shape(1, 1) and act.serving_at(160.0) == Shape(2, 1)
    assert act.busy(159.0) and not act.busy(160.0)
    act.apply(Action.DECODE_TO_PREFILL, 200.0)  # drained at once, back in the other role after drain + start-up
    assert act.serving_at(200.0) == Shape(2, 0) and act.serving_at(290.0) == Shape(3, 0)
    assert act.gpu_seconds(300.0) == pytest.approx(2 * 100 + 3 * 200)


def test_phased_trace_follows_its_phases_and_the_diurnal_curve():
    lens = np.array([10, 20])
    phases = [Phase("a", 10.0, 100.0, lens, lens), Phase("b", 2.0, 100.0, lens * 100, lens)]
    trace = build_phased_trace(phases, seed=1, diurnal=Diurnal(0.5, 200.0))
    assert np.all(np.diff(trace.arrival_s) >= 0)
    first, second = (trace.phase == 0).sum(), (trace.phase == 1).sum()
    assert 1000 < first < 1700 and 40 < second < 200  # rising half of the sine, then the falling half
    assert set(trace.input_len[trace.phase == 1]) <= {1000, 2000}
    assert parse_phases("sharegpt@10:60, x@1.5:2")[1].rate_rps == 1.5


@pytest.fixture(scope="module")
def opt13b():
    from trt_disagg.planner import inputs
    from trt_disagg.planner.placement import ParallelConfig, Placement
    from trt_disagg.planner.request import PlanRequest, plan_inputs
    from trt_disagg.planner.search import spec_for

    inp = plan_inputs(PlanRequest(model="opt-13b", ttft_s=0.5, tpot_s=0.1, num_requests=500))
    tp1 = ParallelConfig("a100-80g", 1, 1)
    longbench = inputs.plan_lengths("longbench-synthetic", inp.model, 500, 0, None, None)
    return spec_for(inp, Placement(tp1, tp1, 1, 1)), inp.lengths, longbench


def test_autoscaled_meets_the_slo_where_the_first_phase_placement_does_not(opt13b):
    base, chat, longbench = opt13b
    phases = [Phase("chat", 10.0, 900.0, chat.input_len, chat.output_len),
              Phase("longbench", 8.0, 900.0, longbench.input_len, longbench.output_len),
              Phase("chat", 10.0, 900.0, chat.input_len, chat.output_len)]
    config = ControllerConfig(interval_s=30.0, cooldown_s=90.0)
    cmp = compare(build_phased_trace(phases, seed=0), base, SLO(0.5, 0.1), Budget(8), config, Delays())
    assert cmp.first_phase.attainment < 0.9 <= cmp.autoscaled.attainment
    assert cmp.autoscaled.gpu_hours <= 1.1 * cmp.oracle.gpu_hours
    changes = [d.at_s for d in cmp.autoscaled.changes]
    assert changes and all(b - a >= config.cooldown_s for a, b in zip(changes, changes[1:], strict=False))
    print(cmp.phase_attainment, cmp.first_phase_shape, cmp.oracle_shape,
          [(r.attainment, r.gpu_hours) for r in (cmp.first_phase, cmp.oracle, cmp.autoscaled)])
