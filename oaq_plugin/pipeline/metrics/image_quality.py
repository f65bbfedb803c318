"""Image quality as every number of the project is measured: PSNR/SSIM of uint8 images on the Y channel,
computed exactly as BasicSR's ``calculate_psnr``/``calculate_ssim``, and the mean CIE76 Delta E.

The protocol (docs/METHOD.md, Metrics): the output clamped to [0, 1] and rounded to uint8, ``crop_border``
pixels (= the scale) removed on each side, then the Y channel of ITU-R BT.601 YCbCr, computed with BasicSR's
float32 arithmetic so that every entry point reports the same digits. Images are (H, W, C) RGB uint8 arrays.
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import DataError

# BT.601 luma weights in BGR order, as BasicSR's bgr2ycbcr applies them (the order of the sum matters
# for the last bit).
_Y_WEIGHTS_BGR = [24.966, 128.553, 65.481]


def tensor_to_uint8(image: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """An (C, H, W) RGB tensor in [0, data_range] as an (H, W, C) uint8 array (clamped, rounded)."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise DataError(f'expected an image tensor (C, H, W), got shape {tuple(image.shape)}')
    array = (image.detach().float().cpu() / data_range).clamp_(0, 1).numpy().transpose(1, 2, 0)
    return (array * 255.0).round().astype(np.uint8)


def y_channel(image: np.ndarray) -> np.ndarray:
    """The Y channel in [0, 255] (float, unrounded) of an RGB uint8 image; other channel counts pass through."""
    scaled = image.astype(np.float32) / 255.
    if scaled.ndim == 3 and scaled.shape[2] == 3:
        luma = (np.dot(scaled[..., ::-1], _Y_WEIGHTS_BGR) + 16.0) / 255.
        scaled = luma.astype(np.float32)[..., None]
    return scaled * 255.


def _prepare(image: np.ndarray, reference: np.ndarray, crop_border: int, test_y_channel: bool) -> tuple:
    if image.shape != reference.shape:
        raise DataError(f'image shapes differ: output {image.shape} vs reference {reference.shape}; is the '
                        'dataset scale the network scale?')
    if crop_border > 0:
        image = image[crop_border:-crop_border, crop_border:-crop_border, ...]
        reference = reference[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel:
        image, reference = y_channel(image), y_channel(reference)
    return image.astype(np.float64), reference.astype(np.float64)


def psnr(image: np.ndarray, reference: np.ndarray, crop_border: int = 0, test_y_channel: bool = True) -> float:
    """PSNR (dB) of two (H, W, C) uint8 RGB images; ``inf`` when they are equal."""
    image, reference = _prepare(image, reference, crop_border, test_y_channel)
    mse = np.mean((image - reference) ** 2)
    if mse == 0:
        return float('inf')
    return float(10. * np.log10(255. * 255. / mse))


def _ssim_single_channel(image: np.ndarray, reference: np.ndarray) -> float:
    import cv2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())

    def blur(x: np.ndarray) -> np.ndarray:
        # [5:-5] keeps the 'valid' part of the 11x11 window, as the reference implementation does.
        return cv2.filter2D(x, -1, window)[5:-5, 5:-5]

    mu1, mu2 = blur(image), blur(reference)
    sigma1 = blur(image ** 2) - mu1 ** 2
    sigma2 = blur(reference ** 2) - mu2 ** 2
    sigma12 = blur(image * reference) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (sigma1 + sigma2 + c2))
    return float(ssim_map.mean())


def ssim(image: np.ndarray, reference: np.ndarray, crop_border: int = 0, test_y_channel: bool = True) -> float:
    """SSIM (Gaussian 11x11 window, sigma 1.5) of two (H, W, C) uint8 RGB images, averaged over channels."""
    image, reference = _prepare(image, reference, crop_border, test_y_channel)
    return float(np.mean([_ssim_single_channel(image[..., c], reference[..., c]) for c in range(image.shape[2])]))


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
