"""PSNR and SSIM for mmengine's evaluator, computed exactly as BasicSR's ``calculate_psnr``/``calculate_ssim``.

The protocol of every number in the project (METHOD.md §9): the output clamped to [0, 1] and rounded to
uint8, ``crop_border`` pixels (= the scale) removed on each side, then the Y channel of ITU-R BT.601
YCbCr, computed with BasicSR's float32 arithmetic so that both adapters report the same digits.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS

from ..errors import DataError

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


class _ImageQualityMetric(BaseMetric):
    """Shared part of PSNR and SSIM: pair each prediction with its ground truth and average per image.

    Args:
        crop_border: Pixels removed on each side before measuring (the scale, by convention).
        test_y_channel: Measure the Y channel of YCbCr instead of RGB.
        data_range: Value of white in ``pred_img``/``gt_img`` (1.0 for images in [0, 1]).
        prediction_key: Field of the model's predictions holding the output image (C, H, W).
        ground_truth_key: Field holding the ground truth image (C, H, W).
        collect_device: ``cpu`` or ``gpu``, where results of distributed runs are gathered.
        prefix: Prefix of the metric names (none by default).
    """

    metric_name = ''
    # An empty default prefix: metric keys stay 'psnr'/'ssim' (as in the report) without mmengine's warning.
    default_prefix = ''

    def __init__(self, crop_border: int = 0, test_y_channel: bool = True, data_range: float = 1.0,
                 prediction_key: str = 'pred_img', ground_truth_key: str = 'gt_img',
                 collect_device: str = 'cpu', prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.crop_border = int(crop_border)
        self.test_y_channel = test_y_channel
        self.data_range = float(data_range)
        self.prediction_key = prediction_key
        self.ground_truth_key = ground_truth_key

    def measure(self, image: np.ndarray, reference: np.ndarray) -> float:
        raise NotImplementedError

    def process(self, data_batch: Any, data_samples: Sequence[Dict[str, Any]]) -> None:
        for sample in data_samples:
            if self.prediction_key not in sample or self.ground_truth_key not in sample:
                name = sample.get('img_name', '?')
                raise DataError(f"{type(self).__name__}: sample '{name}' lacks '{self.prediction_key}' or "
                                f"'{self.ground_truth_key}'; does the test dataset give ground truth images?")
            output = tensor_to_uint8(sample[self.prediction_key], self.data_range)
            reference = tensor_to_uint8(sample[self.ground_truth_key], self.data_range)
            self.results.append(self.measure(output, reference))

    def compute_metrics(self, results: List[float]) -> Dict[str, float]:
        return {self.metric_name: float(np.mean(results))}


@METRICS.register_module()
class PSNRMetric(_ImageQualityMetric):
    """Peak signal-to-noise ratio (dB), reported as ``psnr``. See :class:`_ImageQualityMetric` for Args."""

    metric_name = 'psnr'

    def measure(self, image: np.ndarray, reference: np.ndarray) -> float:
        return psnr(image, reference, self.crop_border, self.test_y_channel)


@METRICS.register_module()
class SSIMMetric(_ImageQualityMetric):
    """Structural similarity, reported as ``ssim``. See :class:`_ImageQualityMetric` for Args."""

    metric_name = 'ssim'

    def measure(self, image: np.ndarray, reference: np.ndarray) -> float:
        return ssim(image, reference, self.crop_border, self.test_y_channel)
