"""The seam between a decision and the world: an `Actuator` enacts one change at a time.

    LocalClusterActuator (serve --autoscale)   processes: start + wait ready, drain + stop, drain + restart
    KubernetesActuator                         replica counts of the prefill and decode StatefulSets
    SimulatedActuator (simulate --autoscale)   instance counts over trace time, start-up and drain delays
    DryRunActuator (autoscale --dry-run)       records what it would do

Ownership: `apply` returns once the change is *started*; `busy` stays true until it has taken effect (the
new instance is ready, the drained one is gone), and the controller makes no further change meanwhile.
A change that fails after `apply` returned (the new instance never gets ready) is reported by an actuator
that `ReportsOutcomes`: the live loop records it as failed and backs off before the next change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from trt_disagg.controller.policy import Action, Shape, apply_action


class Actuator(Protocol):
    def shape(self) -> Shape:
        """The shape the deployment has, or is becoming (after the change in progress)."""
        ...

    def busy(self, now_s: float) -> bool:
        """A change is still taking effect."""
        ...

    def apply(self, action: Action, now_s: float) -> None:
        """Start `action` (never Action.NONE). Raises on a change that cannot be started."""
        ...


@dataclass(frozen=True)
class ChangeOutcome:
    """How one enacted change ended, once it ended."""

    action: Action
    ok: bool
    detail: str  # what was done (instance ids, drain time), or why it failed
    started_s: float
    finished_s: float


@runtime_checkable
class ReportsOutcomes(Protocol):
    """An actuator whose changes finish after `apply` returned, and may fail then."""

    def take_outcomes(self) -> list[ChangeOutcome]:
        """The changes that ended since the last call, oldest first (each reported once)."""
        ...


class DryRunActuator:
    """Acts on nothing: remembers the shape it was told and the actions it would have taken."""

    def __init__(self, shape: Shape) -> None:
        self._shape = shape
        self.actions: list[tuple[float, Action]] = []

    def shape(self) -> Shape:
        return self._shape

    def busy(self, now_s: float) -> bool:
        return False

    def apply(self, action: Action, now_s: float) -> None:
        self.actions.append((now_s, action))
        self._shape = apply_action(self._shape, action)
