"""The goodput benchmark: load generator, metrics, goodput search and report.

Python API (what `trt-disagg bench` and the demo call):

    from trt_disagg.bench import run_at_rate, run_rates, search_goodput, check_endpoint, write_report
    result = await run_at_rate(url, model, requests, arrivals, slo)          # -> RunResult
    goodput = await search_goodput(url, model, requests, slo, num_cores=2)   # -> GoodputResult
    paths = write_report({"disaggregated": goodput, "colocated": other}, "runs/bench")

Names are loaded on first use, so importing `trt_disagg.bench.metrics` does not pull in httpx or
matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RequestRecord": "metrics", "RunResult": "metrics", "RunSummary": "metrics", "Percentiles": "metrics",
    "attainment": "metrics", "attains": "metrics", "summarize": "metrics",
    "GoodputResult": "goodput", "SearchSpec": "goodput", "search_rates": "goodput",
    "check_endpoint": "loadgen", "preflight": "loadgen", "run_at_rate": "loadgen", "run_rates": "loadgen", "search_goodput": "loadgen",
    "write_report": "report", "render_table": "report", "render_goodput_table": "report",
    "RunProgress": "progress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trt_disagg.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trt_disagg.bench.{module}"), name)
