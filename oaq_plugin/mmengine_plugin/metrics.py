"""PSNR and SSIM for mmengine's evaluator, computed exactly as BasicSR's ``calculate_psnr``/``calculate_ssim``
(the measures of :mod:`oaq_plugin.pipeline.metrics.image_quality`, the one place of the protocol)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS

from ..errors import DataError
from ..pipeline.metrics.image_quality import psnr, ssim, tensor_to_uint8

__all__ = ['PSNRMetric', 'SSIMMetric', 'psnr', 'ssim', 'tensor_to_uint8']


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
