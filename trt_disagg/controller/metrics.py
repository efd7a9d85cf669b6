"""The autoscaler's /metrics: every decision as counters and gauges (its reason is in the Redis stream)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from trt_disagg.controller.policy import Decision


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter("trtd_autoscale_decisions", "decisions by action", ["action"], registry=r)
        self.instances = Gauge("trtd_autoscale_instances", "instances by role, as of the last decision", ["role"],
                               registry=r)
        self.predicted = Gauge("trtd_autoscale_predicted_attainment", "predicted SLO attainment", ["when"],
                               registry=r)
        self.observed_rps = Gauge("trtd_autoscale_observed_arrival_rps", "observed arrival rate", registry=r)

    def observe(self, d: Decision) -> None:
        self.decisions.labels(action=d.action.value).inc()
        self.instances.labels(role="prefill").set(d.next_shape.num_prefill)
        self.instances.labels(role="decode").set(d.next_shape.num_decode)
        if d.predicted_before is not None:
            self.predicted.labels(when="before").set(d.predicted_before)
        if d.predicted_after is not None:
            self.predicted.labels(when="after").set(d.predicted_after)
        rate = d.observed.get("arrival_rps")
        if rate is not None:
            self.observed_rps.set(float(rate))
