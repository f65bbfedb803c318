"""Full-precision zoo checkpoints reproduce their verified PSNR-Y on Set5 and Set14 (shared/weights/README.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_psnr
from basicsr.metrics.metric_util import to_y_channel
from basicsr.utils.color_util import rgb2ycbcr

from oaq_plugin.archs import ZOO, FSRCNNLuma, build_zoo_model
from real_checkpoints import image_pairs, rgb_pipeline_psnr

pytestmark = pytest.mark.slow

TEST_SETS = ('Set5', 'Set14')
# The README's values are rounded to 0.01 dB; a faithful reimplementation lands within one rounding step.
TOLERANCE_DB = 0.01
# FSRCNN's verified numbers come from its native protocol (Y in, Y out, rounded). Through BasicSR's RGB pipeline
# the Y of three rounded RGB channels carries less rounding noise than a rounded Y, so it reads slightly higher
# (measured +0.015 to +0.033 dB over the six scale/set pairs); a broken colour conversion costs whole dBs.
RGB_PIPELINE_FSRCNN_TOLERANCE_DB = 0.05


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
    pairs = image_pairs(shared, test_set, entry.scale)
    if entry.arch_type == 'FSRCNN':
        # Its parameters are the luma network's; the RGB wrapper is checked separately below.
        luma_net = FSRCNNLuma(**entry.kwargs).eval()
        luma_net.load_state_dict(model.state_dict(), strict=True)
        psnr = _luma_pipeline_psnr(luma_net, pairs, entry.scale)
    else:
        psnr = rgb_pipeline_psnr(model, pairs, entry.scale)
    expected = _verified(entry, test_set)
    assert abs(psnr - expected) <= TOLERANCE_DB + 1e-9, f'{key} {test_set}: {psnr:.4f} dB, verified {expected:.2f} dB'


@pytest.mark.parametrize('test_set', TEST_SETS)
@pytest.mark.parametrize('key', [key for key, entry in ZOO.items() if entry.arch_type == 'FSRCNN'])
def test_fsrcnn_rgb_pipeline_psnr_is_close_to_verified(shared, key, test_set):
    entry = ZOO[key]
    model = build_zoo_model(key, shared_root=shared)
    psnr = rgb_pipeline_psnr(model, image_pairs(shared, test_set, entry.scale), entry.scale)
    expected = _verified(entry, test_set)
    assert abs(psnr - expected) <= RGB_PIPELINE_FSRCNN_TOLERANCE_DB, (
        f'{key} {test_set}: {psnr:.4f} dB through the RGB pipeline, verified {expected:.2f} dB on Y')
