"""What the real-checkpoint tests share: reading images as BasicSR does, SunHays80 calibration and Set5 PSNR-Y."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import cv2
import torch
from basicsr.metrics.psnr_ssim import calculate_psnr
from basicsr.utils import img2tensor, tensor2img
from torch import nn

from oaq_plugin.pipeline.io.patches import PatchSource

SET5 = ('baby', 'bird', 'butterfly', 'head', 'woman')


def read(path: Path) -> torch.Tensor:
    return img2tensor(cv2.imread(str(path)).astype('float32') / 255.)


def sunhays80(shared: Path, scale: int) -> PatchSource:
    """Every SunHays80 LR image at ``scale``, the calibration set of the benchmarks."""
    return PatchSource([read(p) for p in sorted((shared / f'data/calib/SunHays80/LR_bicubic/X{scale}').glob('*.png'))])


def set5_psnr(shared: Path, scale: int, **networks: nn.Module) -> Dict[str, float]:
    """Mean Set5 PSNR-Y (crop = scale, uint8 output) of each named network."""
    scores: Dict[str, list] = {key: [] for key in networks}
    for name in SET5:
        lq = read(shared / f'data/benchmark/Set5/LR_bicubic/X{scale}/{name}x{scale}.png')[None]
        gt = cv2.imread(str(shared / f'data/benchmark/Set5/HR/{name}.png'))
        with torch.no_grad():
            for key, net in networks.items():
                out = tensor2img([net(lq)])
                scores[key].append(calculate_psnr(out, gt[:out.shape[0], :out.shape[1]], scale, test_y_channel=True))
    return {key: sum(values) / len(values) for key, values in scores.items()}
