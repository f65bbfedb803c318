"""Outlier-aware post-training quantization for super-resolution networks."""
