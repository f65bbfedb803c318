"""Full-precision zoo checkpoints reproduce their verified PSNR-Y on Set5 and Set14 (shared/weights/README.md)."""
from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_psnr
from basicsr.metrics.metric_util import to_y_channel
from basicsr.utils import img2tensor, tensor2img
from basicsr.utils.color_util import rgb2ycbcr

from oaq_plugin.archs import ZOO, FSRCNNLuma, build_zoo_model

pytestmark = pytest.mark.slow

TEST_SETS = ('Set5', 'Set14')
# The README's values are rounded to 0.01 dB; a faithful reimplementation lands within one rounding step.
TOLERANCE_DB = 0.01
# FSRCNN's verified numbers come from its native protocol (Y in, Y out, rounded). Through BasicSR's RGB pipeline
# the Y of three rounded RGB channels carries less rounding noise than a rounded Y, so it reads slightly higher
# (measured +0.015 to +0.033 dB over the six scale/set pairs); a broken colour conversion costs whole dBs.
RGB_PIPELINE_FSRCNN_TOLERANCE_DB = 0.05


@functools.lru_cache(maxsize=None)
def _image_pairs(shared_root: Path, test_set: str, scale: int) -> tuple:
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


def _rgb_pipeline_psnr(model: torch.nn.Module, pairs: tuple, scale: int) -> float:
    """Mean PSNR-Y as BasicSR's SRModel.validation computes it."""
    values = []
    for lr, hr in pairs:
        with torch.inference_mode():
            sr = model(img2tensor(lr, bgr2rgb=True, float32=True).unsqueeze(0))
        gt = img2tensor(hr, bgr2rgb=True, float32=True).unsqueeze(0)
        values.append(calculate_psnr(tensor2img(sr), tensor2img(gt), crop_border=scale, test_y_channel=True))
    return float(np.mean(values))


def _luma_pipeline_psnr(model: torch.nn.Module, pairs: tuple, scale: int) -> float:
    """Mean PSNR-Y with the Y channel alone through the luma network, output clamped and rounded to uint8."""
    values = []
    for lr, hr in pairs:
        luma = rgb2ycbcr(np.ascontiguousarray(lr[..., ::-1]), y_only=True)
        with torch.inference_mode():
            sr = model(torch.from_numpy(luma)[None, None])
        sr_y = (sr[0, 0].clamp(0, 1).numpy() * 255.).round()
        hr_y = to_y_channel(hr * 255.)[..., 0]
        values.append(calculate_psnr(sr_y, hr_y, crop_border=scale))
    return float(np.mean(values))


def _verified(entry, test_set: str) -> float:
    return entry.psnr_set5 if test_set == 'Set5' else entry.psnr_set14


@pytest.mark.parametrize('test_set', TEST_SETS)
@pytest.mark.parametrize('key', list(ZOO))
def test_fp_psnr_matches_verified(shared, key, test_set):
    entry = ZOO[key]
    model = build_zoo_model(key, shared_root=shared)
    pairs = _image_pairs(shared, test_set, entry.scale)
    if entry.arch_type == 'FSRCNN':
        # Its parameters are the luma network's; the RGB wrapper is checked separately below.
        luma_net = FSRCNNLuma(**entry.kwargs).eval()
        luma_net.load_state_dict(model.state_dict(), strict=True)
        psnr = _luma_pipeline_psnr(luma_net, pairs, entry.scale)
    else:
        psnr = _rgb_pipeline_psnr(model, pairs, entry.scale)
    expected = _verified(entry, test_set)
    assert abs(psnr - expected) <= TOLERANCE_DB + 1e-9, f'{key} {test_set}: {psnr:.4f} dB, verified {expected:.2f} dB'


@pytest.mark.parametrize('test_set', TEST_SETS)
@pytest.mark.parametrize('key', [key for key, entry in ZOO.items() if entry.arch_type == 'FSRCNN'])
def test_fsrcnn_rgb_pipeline_psnr_is_close_to_verified(shared, key, test_set):
    entry = ZOO[key]
    model = build_zoo_model(key, shared_root=shared)
    psnr = _rgb_pipeline_psnr(model, _image_pairs(shared, test_set, entry.scale), entry.scale)
    expected = _verified(entry, test_set)
    assert abs(psnr - expected) <= RGB_PIPELINE_FSRCNN_TOLERANCE_DB, (
        f'{key} {test_set}: {psnr:.4f} dB through the RGB pipeline, verified {expected:.2f} dB on Y')
