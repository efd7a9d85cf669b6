"""Workloads: which requests arrive (data sets with token lengths) and when (arrival processes)."""

from trt_disagg.workload.arrivals import ARRIVAL_KINDS, make_arrivals
from trt_disagg.workload.loader import WORKLOAD_NAMES, load_workload
from trt_disagg.workload.types import WorkloadRequest, estimate_tokens

__all__ = ["ARRIVAL_KINDS", "WORKLOAD_NAMES", "WorkloadRequest", "estimate_tokens", "load_workload",
           "make_arrivals"]
