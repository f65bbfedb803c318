"""Colour-shift measure: mean CIE76 Delta E between two RGB images, through CIELAB (D65)."""
from __future__ import annotations

import numpy as np


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of an sRGB image in [0, 1], shape (..., 3)."""
    rgb = np.clip(rgb.astype(np.float64), 0.0, 1.0)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    epsilon, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > epsilon, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def mean_delta_e(rgb_a: np.ndarray, rgb_b: np.ndarray) -> float:
    """Mean Euclidean distance in CIELAB between two same-size sRGB images in [0, 1]."""
    if rgb_a.shape != rgb_b.shape:
        raise ValueError(f'image shapes differ: {rgb_a.shape} vs {rgb_b.shape}')
    return float(np.linalg.norm(srgb_to_lab(rgb_a) - srgb_to_lab(rgb_b), axis=-1).mean())
