"""Metrics for BasicSR's ``val.metrics``: colour shift (mean Delta E) and fidelity PSNR.

Both follow BasicSR's metric convention: HWC uint8 BGR images ``img`` (output) and ``img2``
(reference), extra keys ignored. Inside ``OAQModel`` the reference of ``fidelity_psnr`` is the float
network's output (``img_fp``); elsewhere it is ``img2``.
"""
from __future__ import annotations

import numpy as np

from ..pipeline.metrics.image_quality import mean_delta_e


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border, ...] if border > 0 else img


def calculate_delta_e(img, img2, crop_border: int = 0, **kwargs) -> float:
    """Mean CIE76 Delta E between two BGR uint8 images (lower is better; <1 is invisible)."""
    a = _crop(img, crop_border)[..., ::-1].astype(np.float64) / 255.0
    b = _crop(img2, crop_border)[..., ::-1].astype(np.float64) / 255.0
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f'delta_e needs colour images (H, W, 3), got shape {img.shape}')
    return mean_delta_e(a, b)


def calculate_fidelity_psnr(img, img2, crop_border: int = 0, img_fp=None, test_y_channel: bool = False,
                            **kwargs) -> float:
    """PSNR of the output against the float network's output ``img_fp`` (``img2`` when absent)."""
    from basicsr.metrics.psnr_ssim import calculate_psnr
    reference = img_fp if img_fp is not None else img2
    return calculate_psnr(img, reference, crop_border, test_y_channel=test_y_channel)
