"""Workloads: which requests arrive (data sets with token lengths) and when (arrival processes)."""

from trt_disagg.workload.arrivals import ARRIVAL_KINDS, make_arrivals
from trt_disagg.workload.conversation_trace import (
           ConversationTrace,
           build_conversation_trace,
           load_conversation_trace,
)
from trt_disagg.workload.limits import LONG_PROMPT_POLICIES, Limits
from trt_disagg.workload.loader import WORKLOAD_NAMES, load_lengths_file, load_workload, load_workload_report
from trt_disagg.workload.types import LoadedWorkload, WorkloadReport, WorkloadRequest, estimate_tokens

__all__ = ["ARRIVAL_KINDS", "LONG_PROMPT_POLICIES", "WORKLOAD_NAMES", "ConversationTrace", "Limits", "LoadedWorkload", "WorkloadReport",
           "WorkloadRequest", "estimate_tokens", "load_lengths_file", "load_workload", "load_workload_report",
           "build_conversation_trace", "load_conversation_trace", "make_arrivals"]
