"""Where W8A8 loses quality on IMDN x4: weights only, activations only, and a few variants.

Usage: ``python tools/w8a8_breakdown.py ["{python dict of oaq overrides}" ...]``. Calibrates on 2 batches of
8 SunHays80 patches (48 px) and prints PSNR-Y (crop 4) on Set5 baby/bird/butterfly for each variant.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from oaq_plugin.compat import install_basicsr_compat

install_basicsr_compat()

import cv2  # noqa: E402
import torch  # noqa: E402
from basicsr.metrics.psnr_ssim import calculate_psnr  # noqa: E402
from basicsr.utils import img2tensor, tensor2img  # noqa: E402

from oaq_plugin import quantize  # noqa: E402
from oaq_plugin.archs.zoo import build_zoo_model  # noqa: E402
from oaq_plugin.paths import shared_root  # noqa: E402
from oaq_plugin.pipeline.patches import PatchSource  # noqa: E402
from oaq_plugin.quant import quant_layers  # noqa: E402


def read(path: Path) -> torch.Tensor:
    return img2tensor(cv2.imread(str(path)).astype('float32') / 255.)


def main(argv=None) -> int:
    overrides = [ast.literal_eval(text) for text in (argv if argv is not None else sys.argv[1:])] or [{}]
    shared = shared_root()
    model = build_zoo_model('imdn_x4', shared)
    files = sorted((shared / 'data/calib/SunHays80/LR_bicubic/X4').glob('*.png'))[:16]
    batches = PatchSource([read(p) for p in files]).batches(2, 8, 48, 0)
    data = [(read(shared / f'data/benchmark/Set5/LR_bicubic/X4/{n}x4.png')[None],
             cv2.imread(str(shared / f'data/benchmark/Set5/HR/{n}.png'))) for n in ('baby', 'bird', 'butterfly')]

    def psnr(net) -> float:
        values = []
        with torch.no_grad():
            for lq, gt in data:
                out = tensor2img([net(lq)])
                values.append(calculate_psnr(out, gt[:out.shape[0], :out.shape[1]], 4, test_y_channel=True))
        return sum(values) / len(values)

    print(f'FP {psnr(model):.4f}')
    for extra in overrides:
        config = {'w_bits': 8, 'a_bits': 8, 'search': {'enabled': False}, **extra}
        print(f'{extra} all {psnr(quantize(model, batches, config)):.4f}')
        if not extra:
            qmodel = quantize(model, batches, config)
            for _, layer in quant_layers(qmodel):
                layer.act_quantizer.forward = lambda x: x
            print(f'weights only {psnr(qmodel):.4f}')
            qmodel = quantize(model, batches, config)
            for _, layer in quant_layers(qmodel):
                layer.weight_quantizer.forward = lambda w: w
            print(f'activations only {psnr(qmodel):.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
