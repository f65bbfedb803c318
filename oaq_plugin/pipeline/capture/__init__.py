"""Capturing what flows through a network: forward hooks, layer-input windows, feature taps."""
