"""Analyses of a quantized network beside the run: per-layer sensitivity, end-to-end checks."""
