"""Choose how a quantized model's layers execute: fake quantization, integer reference, or Triton kernels."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

from torch import nn

from ..config import BACKENDS, RunOptions
from ..errors import ConfigError, UnsupportedLayerError, closest
from ..quant.attention import quant_matmuls
from ..quant.layers import quant_layers
from .int8_backend import Int8Executor, int8_unsupported_reason
from .reference import ReferenceExecutor
from .triton_backend import TritonExecutor, triton_available, unsupported_reason

logger = logging.getLogger('oaq_plugin')


def _on_cuda(model: nn.Module) -> bool:
    for tensor in model.parameters():
        return tensor.is_cuda
    return False


def resolve_backend(model: nn.Module, backend: str) -> str:
    """The concrete backend for ``backend``: ``auto`` is triton for a model on CUDA, else reference."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}'{closest(backend, BACKENDS)}; choose one of: "
                          f"{', '.join(BACKENDS)}")
    if backend == 'onnxruntime':
        # A whole-network backend: the run exports the network and validates the ONNX file.
        raise ConfigError("backend 'onnxruntime' runs the whole exported network, not single layers: export it with "
                          "oaq_plugin.export_onnx (a run with oaq.backend: onnxruntime does this itself)")
    if backend != 'auto':
        return backend
    return 'triton' if _on_cuda(model) and triton_available()[0] else 'reference'


def to_backend(qmodel: nn.Module, backend: str = RunOptions.backend, precision: str = 'ieee',
               blocks: Optional[Tuple[int, int, int]] = None) -> nn.Module:
    """Set how every quantized layer of ``qmodel`` runs in ``quant`` mode, in place.

    Quantized attention matmuls (``quantize_attention``) are not replaced: they stay fake quantization.

    Args:
        qmodel: A quantized model (from :func:`oaq_plugin.quantize`).
        backend: ``fake`` (fake quantization, differentiable), ``reference`` (integer codes decoded in
            PyTorch), ``triton`` (fused kernels; layers they cannot run use the reference, one log line
            each), ``triton_int8`` (int8 x int8 -> int32 kernels for layers whose input grid is an integer
            lattice; other layers use ``triton``, or the reference where that cannot run either, one log
            line each) or ``auto`` (triton when the model is on CUDA, else reference).
        precision: Triton ``tl.dot`` input precision (``ieee``, ``tf32x3`` or ``tf32``).
        blocks: Optional Triton ``(BLOCK_M, BLOCK_N, BLOCK_K)`` override (int8 needs ``BLOCK_K >= 32``).

    Returns:
        ``qmodel``.
    """
    chosen = resolve_backend(qmodel, backend)
    layers = quant_layers(qmodel)
    if chosen in ('triton', 'triton_int8'):
        available, why = triton_available()
        if not available:
            raise UnsupportedLayerError(f"the {chosen} backend cannot run here: {why}; use backend 'reference'")
    for name, layer in layers:
        if chosen == 'fake':
            layer.executor, layer.executor_name = None, 'fake'
            continue
        if chosen == 'triton_int8':
            reason = int8_unsupported_reason(layer)
            if reason is None:
                layer.executor, layer.executor_name = Int8Executor(blocks), 'triton_int8'
                continue
            fallback = 'triton' if unsupported_reason(layer) is None else 'reference'
            logger.warning("layer '%s' (%s) runs on the %s backend, not triton_int8: %s", layer.layer_name or name,
                           type(layer.module).__name__, fallback, reason)
            if fallback == 'triton':
                layer.executor, layer.executor_name = TritonExecutor(precision, blocks), 'triton'
                continue
        if chosen == 'triton':
            reason = unsupported_reason(layer)
            if reason is None:
                layer.executor, layer.executor_name = TritonExecutor(precision, blocks), 'triton'
                continue
            logger.warning("layer '%s' (%s) runs on the reference backend: %s", layer.layer_name or name,
                           type(layer.module).__name__, reason)
        layer.executor, layer.executor_name = ReferenceExecutor(), 'reference'
    return qmodel


def backend_summary(qmodel: nn.Module) -> Dict[str, str]:
    """``{layer name: backend}`` of every quantized layer and attention matmul (always ``fake``), for reports."""
    summary = {layer.layer_name or name: layer.executor_name for name, layer in quant_layers(qmodel)}
    summary.update({name: matmul.executor_name for name, matmul in quant_matmuls(qmodel)})
    return summary
