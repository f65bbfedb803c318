"""Execution backends for quantized layers: fake quantization, integer reference, Triton kernels."""
