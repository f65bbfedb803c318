"""Execution backends for quantized layers: fake quantization, integer reference, Triton kernels."""
from .select import BACKENDS, backend_summary, resolve_backend, to_backend

__all__ = ['BACKENDS', 'backend_summary', 'resolve_backend', 'to_backend']
