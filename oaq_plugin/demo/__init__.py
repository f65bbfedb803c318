"""The self-contained demo behind ``make demo``: a small EDSR trained on scikit-image's samples, quantized
at W8A8 and W4A4 with MinMax and dual-region activations through BasicSR, compared in one table.

Run it with ``python -m oaq_plugin.demo``; everything it writes goes under ``./results``.
"""
