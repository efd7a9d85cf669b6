"""The demo (`trt-disagg demo`, `make demo`): disaggregated vs colocated on one machine, measured and predicted."""
