"""What the real-checkpoint tests share: benchmark pairs as BasicSR's paired dataset reads them, PSNR-Y as
BasicSR's validation computes it, and the SunHays80 calibration set."""
from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_psnr
from basicsr.utils import img2tensor, tensor2img

from oaq_plugin.pipeline.io.images import read_image
from oaq_plugin.pipeline.io.patches import PatchSource


@functools.lru_cache(maxsize=None)
def image_pairs(shared_root: Path, test_set: str, scale: int) -> tuple:
    """(LR, HR) pairs as BasicSR's paired dataset reads them: BGR float32 [0, 1], HR mod-cropped to LR * scale."""
    folder = shared_root / 'data' / 'benchmark' / test_set
    hr_paths = sorted((folder / 'HR').glob('*.png'))
    if not hr_paths:
        pytest.skip(f'{test_set} HR images not found at {folder / "HR"}; set OAQ_SHARED')
    pairs = []
    for hr_path in hr_paths:
        lr_path = folder / 'LR_bicubic' / f'X{scale}' / f'{hr_path.stem}x{scale}.png'
        lr = cv2.imread(str(lr_path), cv2.IMREAD_COLOR)
        if lr is None:
            pytest.skip(f'LR image not found at {lr_path}; set OAQ_SHARED')
        hr = cv2.imread(str(hr_path), cv2.IMREAD_COLOR)
        hr = hr[:lr.shape[0] * scale, :lr.shape[1] * scale]
        pairs.append((lr.astype(np.float32) / 255., hr.astype(np.float32) / 255.))
    return tuple(pairs)


def rgb_pipeline_psnr(model: torch.nn.Module, pairs: tuple, scale: int) -> float:
    """Mean PSNR-Y as BasicSR's SRModel.validation computes it."""
    values = []
    for lr, hr in pairs:
        with torch.inference_mode():
            sr = model(img2tensor(lr, bgr2rgb=True, float32=True).unsqueeze(0))
        gt = img2tensor(hr, bgr2rgb=True, float32=True).unsqueeze(0)
        values.append(calculate_psnr(tensor2img(sr), tensor2img(gt), crop_border=scale, test_y_channel=True))
    return float(np.mean(values))


def sunhays80(shared: Path, scale: int) -> PatchSource:
    """Every SunHays80 LR image at ``scale``, the calibration set of the benchmarks."""
    files = sorted((shared / f'data/calib/SunHays80/LR_bicubic/X{scale}').glob('*.png'))
    return PatchSource([read_image(p) for p in files])
