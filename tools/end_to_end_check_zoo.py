"""The end-to-end check on the zoo's x4 checkpoints: its fidelity at W8A8, at W4A4 with the method, and
at W4A4 MinMax (which collapses on some networks), to set the threshold it warns under; and the smallest
weight clips a run ends with, against the clips below which the weight step used to be floored.

Usage::

    OMP_NUM_THREADS=1 python tools/end_to_end_check_zoo.py --out docs/bench/end_to_end_check_zoo.json
    OMP_NUM_THREADS=1 python tools/end_to_end_check_zoo.py --configs W4A4_full --models imdn_x4

Calibrates on the first 60 SunHays80 LR images (``--num-batches`` batches of 16 crops of 96 px; the
default configuration has 6) and runs the check on its own held-back crops of the same pool. Nothing is
measured on a test set. Each record is appended to ``--out`` as it finishes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from oaq_plugin.compat import install_basicsr_compat

install_basicsr_compat()

from oaq_plugin.archs.zoo import build_zoo_model  # noqa: E402
from oaq_plugin.paths import shared_root  # noqa: E402
from oaq_plugin.pipeline.io.images import read_image  # noqa: E402
from oaq_plugin.pipeline.io.patches import PatchSource  # noqa: E402
from oaq_plugin.pipeline.run import run_pipeline  # noqa: E402
from oaq_plugin.quant import quant_layers  # noqa: E402
from oaq_plugin.quant.region_grid import MIN_STEP  # noqa: E402

MODELS = ('imdn_x4', 'rfdn_x4', 'pan_x4', 'carn_m_x4', 'fsrcnn_x4', 'srvgg_x4')
CALIBRATION_IMAGES = 60
_FINETUNE = {'enabled': True, 'epochs': 10, 'iters_per_epoch': 10, 'patch_size': 48, 'batch_size': 2}
_OFF = {'enabled': False}  # the threshold was measured on runs without block reconstruction or distillation
CONFIGS = {
    'W8A8': {'w_bits': 8, 'a_bits': 8, 'reconstruction': _OFF, 'distillation': _OFF},
    'W4A4': {'reconstruction': _OFF, 'distillation': _OFF},
    'W4A4_minmax': {'act_quantizer': 'minmax', 'search': {'enabled': False}, 'reconstruction': _OFF,
                                                                             'distillation': _OFF},
    'W4A4_full': {'finetune': _FINETUNE, 'reconstruction': _OFF, 'distillation': _OFF},
}


def smallest_clips(qmodel) -> dict:
    """The smallest weight clip of the run and its margin over the clip under which a ``bits``-bit step
    used to be floored (``MIN_STEP * (levels - 1) / 2``): a margin above 1 means the old arithmetic gave the
    same codes."""
    smallest, margin = float('inf'), float('inf')
    for _, layer in quant_layers(qmodel):
        quantizer = layer.weight_quantizer
        clip = float(quantizer.clip.detach().min())
        smallest = min(smallest, clip)
        margin = min(margin, clip / (MIN_STEP * (quantizer.num_levels - 1) / 2))
    return {'smallest_clip': smallest, 'margin_over_old_floor': margin}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='*', default=list(MODELS))
    parser.add_argument('--configs', nargs='*', default=['W8A8', 'W4A4', 'W4A4_minmax'], choices=sorted(CONFIGS))
    parser.add_argument('--num-batches', type=int, default=2)
    parser.add_argument('--out', type=Path, default=None)
    args = parser.parse_args(argv)
    shared = shared_root()
    files = sorted((shared / 'data/calib/SunHays80/LR_bicubic/X4').glob('*.png'))[:CALIBRATION_IMAGES]
    source = PatchSource([read_image(path) for path in files])
    records = []
    for key in args.models:
        model = build_zoo_model(key, shared)
        for name in args.configs:
            options = {**CONFIGS[name], 'calib': {'num_batches': args.num_batches}}
            start = time.perf_counter()
            result = run_pipeline(model, source, options)
            check = result.check
            record = {'model': key, 'config': name, 'options': options, 'check': check.to_dict(),
                      **smallest_clips(result.model), 'seconds': round(time.perf_counter() - start, 1)}
            records.append(record)
            print(f'{key} {name}: {check.summary()} | smallest clip {record["smallest_clip"]:.3g} '
                  f'({record["margin_over_old_floor"]:.3g}x the old floor)', flush=True)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({
                    'command': 'OMP_NUM_THREADS=1 python tools/end_to_end_check_zoo.py ' + ' '.join(sys.argv[1:]),
                    'date': datetime.date.today().isoformat(), 'machine': platform.processor() or platform.machine(),
                    'torch_threads': torch.get_num_threads(), 'records': records}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
