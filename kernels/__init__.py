"""Triton kernels for quantized layers (installed as ``oaq_plugin.kernels``)."""
