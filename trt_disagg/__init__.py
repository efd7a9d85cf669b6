"""trt-disagg: disaggregated prefill/decode serving (DistServe) on TensorRT-LLM + Triton, with a CPU reference."""

__version__ = "0.1.0"
