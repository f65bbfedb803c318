"""Held-out fidelity of quantized zoo models: option variants, and weights-only / activations-only splits.

Usage::

    python tools/heldout_fidelity.py [--model imdn_x4] ["{python dict of oaq overrides}" ...]

Calibrates on the first 60 SunHays80 LR images (6 batches of 16 crops, 96 px) and measures fidelity
PSNR-Y (crop = scale) of the quantized output against the float output on 128-px centre crops of the
other 20 SunHays80 images: a held-out signal, so option choices made with it never see a test set.
Each variant is W8A8 with the search disabled unless the overrides say otherwise (e.g.
``"{'w_bits': 4, 'a_bits': 4, 'search': {'enabled': True}}"``).
"""
from __future__ import annotations

import argparse
import ast
import sys

from oaq_plugin.compat import install_basicsr_compat

install_basicsr_compat()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from basicsr.metrics.psnr_ssim import calculate_psnr  # noqa: E402

from oaq_plugin import quantize  # noqa: E402
from oaq_plugin.archs.zoo import ZOO, build_zoo_model  # noqa: E402
from oaq_plugin.paths import shared_root  # noqa: E402
from oaq_plugin.pipeline.images import read_image  # noqa: E402
from oaq_plugin.pipeline.patches import PatchSource  # noqa: E402
from oaq_plugin.quant import quant_layers  # noqa: E402

CALIBRATION_IMAGES = 60
HELD_OUT_CROP = 128


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = image.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[:, top:top + size, left:left + size]


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.squeeze(0).clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1] * 255.0).round().astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='imdn_x4', choices=sorted(ZOO))
    parser.add_argument('--no-split', action='store_true', help='skip the weights-only / activations-only rows')
    parser.add_argument('variants', nargs='*', help='python dicts of oaq overrides (default: one, empty)')
    args = parser.parse_args(argv)
    overrides = [ast.literal_eval(text) for text in args.variants] or [{}]
    shared = shared_root()
    scale = ZOO[args.model].scale
    model = build_zoo_model(args.model, shared)
    files = sorted((shared / f'data/calib/SunHays80/LR_bicubic/X{scale}').glob('*.png'))
    calibration = PatchSource([read_image(p) for p in files[:CALIBRATION_IMAGES]])
    held_out = [centre_crop(read_image(p), HELD_OUT_CROP)[None] for p in files[CALIBRATION_IMAGES:]]
    with torch.no_grad():
        references = [to_uint8(model(x)) for x in held_out]

    def fidelity(net) -> float:
        with torch.no_grad():
            return float(np.mean([calculate_psnr(to_uint8(net(x)), ref, scale, test_y_channel=True)
                                  for x, ref in zip(held_out, references)]))

    print(f'{args.model}: fidelity PSNR-Y vs FP on {len(held_out)} held-out SunHays80 crops', flush=True)
    for extra in overrides:
        config = {'w_bits': 8, 'a_bits': 8, 'search': {'enabled': False}, **extra}
        print(f'{extra} all {fidelity(quantize(model, calibration, config)):.3f}', flush=True)
        if args.no_split:
            continue
        qmodel = quantize(model, calibration, config)
        for _, layer in quant_layers(qmodel):
            layer.act_quantizer.forward = lambda x: x
        print(f'{extra} weights only {fidelity(qmodel):.3f}', flush=True)
        qmodel = quantize(model, calibration, config)
        for _, layer in quant_layers(qmodel):
            layer.weight_quantizer.forward = lambda w: w
        print(f'{extra} activations only {fidelity(qmodel):.3f}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
