"""Validation shared by every entry point: per-image fidelity PSNR and Delta E of the quantized output
against the float output, the crop figures, the per-test-set means and the summary table."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from ..pipeline.io.figures import crop_titles, side_by_side_crop
from ..pipeline.metrics.image_quality import mean_delta_e, psnr

PROTOCOL_NOTE = ('fp/quant: the test metrics of the float and the quantized network against the ground truth; '
                 'fidelity_psnr = quantized vs float output (Y, crop = scale); delta_e = mean CIE76 Delta E '
                 'quantized vs float output (crop = scale)')


def compare_outputs(quant: np.ndarray, fp: np.ndarray, border: int) -> Dict[str, float]:
    """``fidelity_psnr`` (Y channel) and ``delta_e`` of the quantized output against the float output.

    Args:
        quant: The quantized network's output, (H, W, C) RGB uint8 (or (H, W) grayscale).
        fp: The float network's output, the same shape.
        border: Pixels removed on each side first (the scale, by convention).

    Returns:
        Both values; ``delta_e`` only for colour images (it needs three channels).
    """
    values = {'fidelity_psnr': psnr(quant, fp, border, test_y_channel=True)}
    if quant.ndim == 3 and quant.shape[-1] == 3:
        crop = (slice(border, -border or None),) * 2
        values['delta_e'] = mean_delta_e(quant[crop] / 255.0, fp[crop] / 255.0)
    return values


def write_crop(path: Path, quant: np.ndarray, fp: np.ndarray, gt: Optional[np.ndarray],
               values: Mapping[str, float]) -> None:
    """The crop figure of one image: ground truth (when there is one), FP and quantized with their PSNRs,
    and the map of the quantization error. Images are (H, W, C) RGB uint8."""
    panels = [image if image.ndim == 3 and image.shape[-1] == 3 else np.repeat(image.reshape(*image.shape[:2], 1),
                                                                               3, axis=-1)
              for image in ([gt] if gt is not None else []) + [fp, quant]]
    side_by_side_crop([panel[..., ::-1] for panel in panels], crop_titles(values, gt is not None), path,
                      difference=(len(panels) - 1, len(panels) - 2), difference_label='quantized - FP')


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class DatasetTally:
    """The per-image measures of one test set, gathered from every process, and their means.

    Args:
        name: The test set's name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.per_image: Dict[str, Dict[str, float]] = {}
        self.start = time.perf_counter()

    def add(self, image: str, values: Mapping[str, float]) -> None:
        """Record one image's measures (``fp_<metric>``, ``quant_<metric>``, ``fidelity_psnr``, ``delta_e``)."""
        self.per_image[image] = dict(values)

    def gather(self) -> None:
        """Merge the images measured by every process (each validates its share), in every process."""
        world = _distributed_world()
        if world > 1:
            parts: list = [None] * world
            torch.distributed.all_gather_object(parts, self.per_image)
            self.per_image = {image: values for part in parts for image, values in part.items()}

    def mean(self, key: str) -> Optional[float]:
        """The mean of ``key`` over the images that have it (``None`` when none has); summed exactly, so
        the mean does not depend on the order in which processes measured the images."""
        values = [v[key] for v in self.per_image.values() if key in v]
        return math.fsum(values) / len(values) if values else None

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def result(self, metrics: Sequence[str]) -> Dict[str, Any]:
        """The test set's entry of ``oaq_report.json``: mean ``fp`` and ``quant`` metrics (from the per-image
        ``fp_<m>``/``quant_<m>``), ``fidelity_psnr``, ``delta_e``, ``num_images`` and ``per_image``."""
        return {
            'fp': {m: self.mean(f'fp_{m}') for m in metrics},
            'quant': {m: self.mean(f'quant_{m}') for m in metrics},
            'fidelity_psnr': self.mean('fidelity_psnr'),
            'delta_e': self.mean('delta_e'),
            'num_images': len(self.per_image),
            'per_image': dict(sorted(self.per_image.items())),
        }


def summary_table(name: str, result: Mapping[str, Any]) -> str:
    """The table logged after each test set: each metric for FP and quantized, then fidelity PSNR and Delta E."""
    rows = [f'OAQ results on {name} ({result["num_images"]} images):', f'\t{"metric":<14}{"FP":>10}{"quantized":>12}']
    for metric, value in result['quant'].items():
        fp = result['fp'].get(metric)
        fp_text = f'{fp:>10.4f}' if isinstance(fp, float) else f'{"-":>10}'
        rows.append(f'\t{metric:<14}{fp_text}{value:>12.4f}' if isinstance(value, float) else f'\t{metric:<14}{value}')
    for metric in ('fidelity_psnr', 'delta_e'):
        if result.get(metric) is not None:
            rows.append(f'\t{metric:<14}{"":>10}{result[metric]:>12.4f}')
    return '\n'.join(rows)
