"""Discrete-event simulator of disaggregated and colocated serving (planning path: profile → latency model →
simulate → place → plan)."""

from trt_disagg.sim.loop import simulate
from trt_disagg.sim.result import SimResult
from trt_disagg.sim.spec import (
    ColocatedPolicy,
    ColocatedSpec,
    ConversationLinks,
    DisaggSpec,
    InstanceSpec,
    PrefixReuse,
    Routing,
    SimWorkload,
)

__all__ = ["ColocatedPolicy", "ColocatedSpec", "ConversationLinks", "DisaggSpec", "InstanceSpec", "PrefixReuse",
           "Routing", "SimResult", "SimWorkload", "simulate"]
