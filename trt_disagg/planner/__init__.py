"""The planning path: profile → latency model → simulate → place → plan.

    profile.py        time a real engine over a grid (`trt-disagg profile`)       -> samples
    fit.py            least squares on relative error                             -> coefficients
    latency_model.py  prefill / decode-step times per (model, GPU, TP); PP timing  (+ roofline.py, data/)
    memory.py         KV capacity per (model, GPU, TP, PP): what fits
    goodput.py        highest rate meeting the SLO attainment, by simulation (trt_disagg.sim)
    search.py         DistServe Alg. 1 / Alg. 2 and the colocated baseline      -> PlanResult
    deployment.py     the chosen placement as a deployment YAML (trt_disagg.config)
"""
