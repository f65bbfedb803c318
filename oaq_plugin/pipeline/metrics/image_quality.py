"""Image quality as every number of the project is measured: PSNR/SSIM of uint8 images on the Y channel,
computed exactly as BasicSR's ``calculate_psnr``/``calculate_ssim``, and the mean CIE76 Delta E.

The protocol (docs/METHOD.md, Metrics): the output clamped to [0, 1] and rounded to uint8, ``crop_border``
pixels (= the scale) removed on each side, then the Y channel of ITU-R BT.601 YCbCr, computed with BasicSR's
float32 arithmetic so that every entry point reports the same digits. Images are (H, W, C) RGB uint8 arrays.
"""
from __future__ import annotations

import math

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
    return psnr_from_mse(float(np.mean((image - reference) ** 2)))


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


def luma(image: torch.Tensor) -> torch.Tensor:
    """BT.601 Y (16-235) of an RGB [0, 1] image tensor (C, H, W) after rounding it to uint8; one channel passes.

    The tensor form of the protocol, for the analyses that score many network outputs without leaving torch;
    it gives the digits of :func:`psnr` on :func:`tensor_to_uint8` images to about 1e-6 dB.
    """
    pixels = (image.detach().float().clamp(0, 1) * 255.0).round().double()
    if pixels.shape[0] == 3:
        r, g, b = pixels[0], pixels[1], pixels[2]
        return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    return pixels[0]


def y_mse(output: torch.Tensor, reference: torch.Tensor, crop_border: int) -> float:
    """Mean squared error on the Y channel, after uint8 rounding and cropping ``crop_border`` pixels
    (the metric protocol of docs/METHOD.md, Metrics)."""
    y_out, y_ref = luma(output), luma(reference)
    height = min(y_out.shape[-2], y_ref.shape[-2])
    width = min(y_out.shape[-1], y_ref.shape[-1])
    y_out, y_ref = y_out[:height, :width], y_ref[:height, :width]
    if crop_border:
        y_out = y_out[crop_border:-crop_border, crop_border:-crop_border]
        y_ref = y_ref[crop_border:-crop_border, crop_border:-crop_border]
    return float((y_out - y_ref).pow(2).mean())


def psnr_from_mse(mse: float) -> float:
    """PSNR (dB) of 8-bit images from their mean squared error; ``inf`` for equal images."""
    return float('inf') if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def psnr_y(output: torch.Tensor, reference: torch.Tensor, crop_border: int) -> float:
    """PSNR on the Y channel of two RGB [0, 1] images (C, H, W): the numbers of BasicSR's
    ``calculate_psnr(..., test_y_channel=True)`` on ``tensor2img`` images."""
    return psnr_from_mse(y_mse(output, reference, crop_border))
