"""The decision rule: given the observed workload and the current shape, one change or none, with a reason.

    observed ─▶ too few requests? ─▶ none
             ─▶ predicted attainment of the current shape (simulator), measured attainment of the window
             ─▶ cooldown since the last change, or a change still in progress? ─▶ none (recorded)
             ─▶ at risk (predicted or measured < target):
                    best shape in the budget, no cheaper than the current one = the cheapest with
                    predicted >= target + up_margin
                    (else the highest predicted); one step towards it, if that step predicts better
             ─▶ wasteful (both >= target): the cheapest one-instance removal whose prediction stays
                    >= target + down_margin
             ─▶ else none

A change that fails (an instance that does not start) is retried with a growing back-off: after the k-th
failure in a row no change is made for min(max_failure_backoff_s, max(cooldown_s, interval_s) * 2^(k-1));
the first change that takes effect resets it (`note_failure` / `note_success`, told by the live loop).

Hysteresis is the gap between the two margins: a shape is grown back only when it misses the target, and
shrunk only when the smaller shape clears the target by `down_margin`, so a load near a boundary never
alternates between them. The cooldown bounds changes to one per `cooldown_s` whatever the predictions say.
One step is one instance started, stopped, or switched between prefill and decode: a role switch when the
best shape has more of one phase and fewer of the other, so the GPU count never rises to rebalance.

Pure: `decide(now_s, ...)` takes the clock as an argument and the prediction as a `Predictor`; the live loop,
the simulated run and the unit tests all call it the same way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from trt_disagg.controller.observe import ObservedWorkload
from trt_disagg.errors import UserError


@dataclass(frozen=True, order=True)
class Shape:
    """How many prefill and decode instances (each of the deployment's fixed TP x PP per role)."""

    num_prefill: int
    num_decode: int

    def __str__(self) -> str:
        return f"{self.num_prefill}P{self.num_decode}D"


class Action(enum.StrEnum):
    NONE = "none"
    ADD_PREFILL = "add_prefill"
    ADD_DECODE = "add_decode"
    REMOVE_PREFILL = "remove_prefill"
    REMOVE_DECODE = "remove_decode"
    PREFILL_TO_DECODE = "prefill_to_decode"  # drain a prefill instance, restart it as decode
    DECODE_TO_PREFILL = "decode_to_prefill"


STEP: dict[Action, tuple[int, int]] = {
    Action.NONE: (0, 0), Action.ADD_PREFILL: (1, 0), Action.ADD_DECODE: (0, 1), Action.REMOVE_PREFILL: (-1, 0),
    Action.REMOVE_DECODE: (0, -1), Action.PREFILL_TO_DECODE: (-1, 1), Action.DECODE_TO_PREFILL: (1, -1)}


def apply_action(shape: Shape, action: Action) -> Shape:
    dn, dm = STEP[action]
    return Shape(shape.num_prefill + dn, shape.num_decode + dm)


@dataclass(frozen=True)
class Budget:
    """What the controller may deploy: instances in all, GPUs per instance of each role, cost per GPU."""

    max_instances: int
    prefill_gpus: int = 1
    decode_gpus: int = 1
    prefill_cost: float = 1.0  # per GPU, as `plan --pool GPU:NxG@COST`
    decode_cost: float = 1.0
    max_gpus: int | None = None
    min_prefill: int = 1  # never fewer instances of a role than this (and never none)
    min_decode: int = 1

    def __post_init__(self) -> None:
        if self.max_instances < 2:
            raise UserError(f"autoscale.max_instances must be >= 2 (one prefill, one decode), got {self.max_instances}")
        if min(self.prefill_gpus, self.decode_gpus) < 1:
            raise UserError("autoscale: GPUs per instance must be >= 1")
        if self.max_gpus is not None and self.max_gpus < self.prefill_gpus + self.decode_gpus:
            raise UserError(f"autoscale.max_gpus={self.max_gpus} cannot hold one prefill ({self.prefill_gpus} "
                            f"GPUs) and one decode ({self.decode_gpus} GPUs) instance")

    def gpus(self, shape: Shape) -> int:
        return shape.num_prefill * self.prefill_gpus + shape.num_decode * self.decode_gpus

    def cost(self, shape: Shape) -> float:
        return (shape.num_prefill * self.prefill_gpus * self.prefill_cost
                + shape.num_decode * self.decode_gpus * self.decode_cost)

    def allows(self, shape: Shape) -> bool:
        return (shape.num_prefill >= max(1, self.min_prefill) and shape.num_decode >= max(1, self.min_decode)
                and shape.num_prefill + shape.num_decode <= self.max_instances
                and (self.max_gpus is None or self.gpus(shape) <= self.max_gpus))

    def shapes(self) -> list[Shape]:
        return [Shape(n, m) for n in range(1, self.max_instances) for m in range(1, self.max_instances)
                if self.allows(Shape(n, m))]


class Predictor(Protocol):
    def attainment(self, shape: Shape, observed: ObservedWorkload) -> float:
        """Predicted joint SLO attainment of `shape` serving `observed` over the next interval."""
        ...


@dataclass(frozen=True)
class ControllerConfig:
    interval_s: float = 30.0
    cooldown_s: float = 120.0
    target: float = 0.9  # the SLO attainment to keep
    up_margin: float = 0.03  # a grown shape is chosen to predict >= target + up_margin
    down_margin: float = 0.05  # a shrunk shape must predict >= target + down_margin
    min_gain: float = 0.01  # a step taken for risk must predict at least this much better
    min_requests: int = 20  # fewer finished requests in the window: too little to decide on
    window_s: float = 120.0  # the observed workload is the requests of the last window_s (>= interval_s)
    down_rate_headroom: float = 1.2  # a shrunk shape must also hold the observed rate x this (noise margin)
    max_failure_backoff_s: float = 1800.0  # the longest wait after failed changes in a row

    def failure_backoff_s(self, num_failures: int) -> float:
        """How long no change is made after `num_failures` failed changes in a row (doubling)."""
        base = max(self.cooldown_s, self.interval_s)
        return min(self.max_failure_backoff_s, base * 2 ** max(0, num_failures - 1))

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise UserError(f"autoscale.interval_s must be > 0, got {self.interval_s}")
        if self.cooldown_s < 0:
            raise UserError(f"autoscale.cooldown_s must be >= 0, got {self.cooldown_s}")
        if not 0 < self.target <= 1:
            raise UserError(f"autoscale.target must be in (0, 1], got {self.target}")
        if self.down_margin < self.up_margin:
            raise UserError("autoscale.down_margin must be >= up_margin (else shrinking undoes growing)")
        if self.window_s < self.interval_s:
            raise UserError(f"autoscale.window_s ({self.window_s}) must be >= interval_s ({self.interval_s})")
        if self.down_rate_headroom < 1:
            raise UserError(f"autoscale.down_rate_headroom must be >= 1, got {self.down_rate_headroom}")


@dataclass(frozen=True)
class Decision:
    at_s: float
    shape: Shape  # before the action
    action: Action
    reason: str
    predicted_before: float | None  # attainment of `shape`
    predicted_after: float | None  # attainment after the action (None: no action)
    target_shape: Shape | None  # where the steps lead (None: no search ran)
    observed: dict[str, float | int | None] = field(default_factory=dict)
    failed: Action | None = None  # set on the record of a change that could not be enacted (action is NONE)

    @property
    def next_shape(self) -> Shape:
        return apply_action(self.shape, self.action)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "at_s": self.at_s, "shape": str(self.shape), "action": self.action.value, "reason": self.reason,
            "next_shape": str(self.next_shape), "predicted_before": self.predicted_before,
            "predicted_after": self.predicted_after,
            "target_shape": str(self.target_shape) if self.target_shape else None, "observed": self.observed}
        if self.failed is not None:
            out["failed"] = self.failed.value
        return out


class Controller:
    """The decision rule with its memory: when the last change was made (for the cooldown)."""

    def __init__(self, config: ControllerConfig, budget: Budget, predictor: Predictor) -> None:
        self.config = config
        self.budget = budget
        self.predictor = predictor
        self.last_change_s: float | None = None
        self.num_failures = 0  # failed changes in a row
        self.retry_at_s: float | None = None  # no change before this (back-off after a failure)

    def note_failure(self, now_s: float) -> float:
        """A change failed at `now_s`: back off (doubling with each failure in a row); the wait, seconds."""
        self.num_failures += 1
        wait_s = self.config.failure_backoff_s(self.num_failures)
        self.retry_at_s = now_s + wait_s
        return wait_s

    def note_success(self) -> None:
        """A change took effect: the failures before it no longer count."""
        self.num_failures, self.retry_at_s = 0, None

    def decide(self, now_s: float, shape: Shape, observed: ObservedWorkload, *, busy: bool = False) -> Decision:
        """One decision at `now_s`. `busy`: the actuator is still enacting the previous change."""
        cfg = self.config
        seen = observed.summary()
        if observed.num_requests < cfg.min_requests:
            return Decision(now_s, shape, Action.NONE, f"only {observed.num_requests} requests finished in the "
                            f"window (< {cfg.min_requests}): too little to decide on", None, None, None, seen)
        before = self.predictor.attainment(shape, observed)
        measured = observed.measured_attainment

        def hold(reason: str, target: Shape | None = None) -> Decision:
            return Decision(now_s, shape, Action.NONE, reason, before, None, target, seen)

        if busy:
            return hold("the previous change is still in progress (one change at a time)")
        if self.retry_at_s is not None and now_s < self.retry_at_s:
            return hold(f"back-off: {self.num_failures} failed change(s) in a row; next try in "
                        f"{self.retry_at_s - now_s:.0f} s")
        if self.last_change_s is not None and now_s - self.last_change_s < cfg.cooldown_s:
            return hold(f"cooldown: last change {now_s - self.last_change_s:.0f} s ago (< {cfg.cooldown_s:.0f} s)")
        if before < cfg.target or (measured is not None and measured < cfg.target):
            decision = self._grow(now_s, shape, observed, before, measured)
        else:
            decision = self._shrink(now_s, shape, observed, before)
        if decision.action is not Action.NONE:
            self.last_change_s = now_s
        return decision

    def _grow(self, now_s: float, shape: Shape, observed: ObservedWorkload, before: float,
              measured: float | None) -> Decision:
        """SLOs at risk: step towards the best shape the budget allows."""
        cfg, seen = self.config, observed.summary()
        risk = (f"SLOs at risk: predicted {before:.1%}"
                + (f", measured {measured:.1%}" if measured is not None else "") + f" < target {cfg.target:.0%}")
        floor_cost = self.budget.cost(shape)  # at risk, never towards a cheaper shape
        predicted = {s: (before if s == shape else self.predictor.attainment(s, observed))
                     for s in self.budget.shapes() if self.budget.cost(s) >= floor_cost}
        if not predicted:
            return Decision(now_s, shape, Action.NONE, risk + "; the budget allows no shape", before, None, None, seen)
        safe = [s for s, a in predicted.items() if a >= cfg.target + cfg.up_margin]
        best = (min(safe, key=lambda s: (self.budget.cost(s), -predicted[s], s)) if safe
                else max(predicted, key=lambda s: (predicted[s], -self.budget.cost(s))))
        steps = [a for a in _towards(shape, best) if self.budget.allows(apply_action(shape, a))
                 and a not in (Action.REMOVE_PREFILL, Action.REMOVE_DECODE)]
        if not steps:
            return Decision(now_s, shape, Action.NONE, risk + f"; already the best shape within the budget "
                            f"({best}, predicted {predicted[best]:.1%})", before, None, best, seen)
        action = max(steps, key=lambda a: predicted.get(apply_action(shape, a), 0.0))
        after = predicted.get(apply_action(shape, action), 0.0)
        # A step may not help alone (both phases short: one more of either is still short), but it must not
        # hurt, and where it leads must be better.
        if predicted[best] < before + cfg.min_gain or after < before:
            return Decision(now_s, shape, Action.NONE, risk + f"; {best} (predicted {predicted[best]:.1%}) is no "
                            f"better, or its first step predicts worse ({after:.1%})", before, None, best, seen)
        return Decision(now_s, shape, action, risk + f"; best shape in the budget {best} predicts "
                        f"{predicted[best]:.1%}; first step {action}", before, after, best, seen)

    def _shrink(self, now_s: float, shape: Shape, observed: ObservedWorkload, before: float) -> Decision:
        """SLOs met: give back one instance if the smaller shape still clears target + down_margin."""
        cfg, seen = self.config, observed.summary()
        floor = cfg.target + cfg.down_margin
        busier = observed.at_rate(observed.arrival_rps * cfg.down_rate_headroom)
        options = []
        for action in (Action.REMOVE_PREFILL, Action.REMOVE_DECODE):
            smaller = apply_action(shape, action)
            if self.budget.allows(smaller):
                options.append((self.budget.cost(smaller), -self.predictor.attainment(smaller, busier), action))
        fitting = [(c, -neg, a) for c, neg, a in options if -neg >= floor]
        if not fitting:
            return Decision(now_s, shape, Action.NONE, f"SLOs met (predicted {before:.1%}); no smaller shape "
                            f"predicts >= {floor:.0%} at {cfg.down_rate_headroom:g}x the rate", before, None, None,
                            seen)
        cost, after, action = min(fitting, key=lambda o: (o[0], -o[1]))
        return Decision(now_s, shape, action, f"capacity wasted: predicted {before:.1%}, and "
                        f"{apply_action(shape, action)} still predicts {after:.1%} at {cfg.down_rate_headroom:g}x the rate "
                        f"(>= {floor:.0%})", before, after,
                        apply_action(shape, action), seen)


def _towards(shape: Shape, best: Shape) -> list[Action]:
    """The single steps that move `shape` towards `best` (a role switch when one phase gains, the other loses)."""
    dn, dm = best.num_prefill - shape.num_prefill, best.num_decode - shape.num_decode
    if dn > 0 and dm < 0:
        return [Action.DECODE_TO_PREFILL]
    if dn < 0 and dm > 0:
        return [Action.PREFILL_TO_DECODE]
    steps = []
    if dn > 0:
        steps.append(Action.ADD_PREFILL)
    if dm > 0:
        steps.append(Action.ADD_DECODE)
    if dn < 0:
        steps.append(Action.REMOVE_PREFILL)
    if dm < 0:
        steps.append(Action.REMOVE_DECODE)
    return steps
