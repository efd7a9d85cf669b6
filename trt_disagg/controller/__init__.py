"""The online SLA planner: every interval, the observed workload decides the prefill:decode shape.

    finished-request summaries (Redis stream, or a simulation) ─▶ observe.ObservedWorkload
        ─▶ policy.Controller.decide (pure: a clock value in, a Decision out; predicts with the simulator)
        ─▶ Actuator.apply (one change at a time: LocalCluster processes, Kubernetes replicas, simulated
           instances) ─▶ the decision and its reason recorded (Redis stream, metrics)

`policy` holds every rule (thresholds, hysteresis, cooldown, one change at a time) and does no I/O, so the
same code decides live, in `trt-disagg simulate --autoscale` and in unit tests on a fake clock.
"""
