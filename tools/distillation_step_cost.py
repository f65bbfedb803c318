"""Distillation step times of zoo networks against their counted work: where the weights of the work budget's
count (``ELEMENT_WORK``, ``LAYER_WORK`` in ``oaq_plugin/pipeline/stages/distillation_length.py``) come from.

Usage::

    python tools/distillation_step_cost.py [--models imdn_x4 rfdn_x4 ...] [--steps 30] [--threads 1] [--out DIR]

For each network: one calibration batch of SunHays80 crops, no search, no reconstruction, then ``--steps``
distillation steps of the default shape (the stage's own seconds per step). The counted parts of a step
(multiply-adds, values entering quantized layers, quantized layers) are fit to the times by least squares,
and each network's time is compared with the fit and with today's weights. Writes
``distillation_step_cost.json`` and prints a table. Times are this machine's under its load; their ratios
are what the budget uses, so run every network in one call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import List

from oaq_plugin.compat import install_basicsr_compat

install_basicsr_compat()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from oaq_plugin import run_pipeline  # noqa: E402
from oaq_plugin.archs.zoo import ZOO, build_zoo_model  # noqa: E402
from oaq_plugin.config import OAQConfig  # noqa: E402
from oaq_plugin.paths import shared_root  # noqa: E402
from oaq_plugin.pipeline.io.images import read_image  # noqa: E402
from oaq_plugin.pipeline.io.patches import PatchSource  # noqa: E402
from oaq_plugin.pipeline.stages.distillation_length import ELEMENT_WORK, LAYER_WORK, step_work  # noqa: E402

DEFAULT_MODELS = ['imdn_x4', 'rfdn_x4', 'pan_x4', 'carn_m_x4', 'srvgg_x4']


def measure(key: str, steps: int) -> dict:
    """Seconds per distillation step of ``key`` and the counted parts of that step."""
    settings = OAQConfig().distillation
    scale = ZOO[key].scale
    files = sorted((shared_root() / f'data/calib/SunHays80/LR_bicubic/X{scale}').glob('*.png'))
    source = PatchSource([read_image(p) for p in files[:8]])
    model = build_zoo_model(key, shared_root())
    config = {'calib': {'num_batches': 1, 'batch_size': 4, 'patch_size': 64}, 'search': {'enabled': False},
              'reconstruction': {'enabled': False}, 'distillation': {'iterations': steps, 'check_crops': 2}}
    result = run_pipeline(model, source, config, progress=False)
    crop = source.batch(1, settings.patch_size, torch.Generator().manual_seed(0))
    work = step_work(result.model, crop, settings.batch_size)
    return {'model': key, 'seconds_per_step': result.reports['distillation'].seconds_per_iteration,
            'macs': work.batch_size * work.macs, 'quantized_values': work.batch_size * work.quantized_values,
            'layers': work.layers, 'work': work.total, 'steps_given': work.iterations(settings)}


def fit(rows: List[dict]) -> dict:
    """Least-squares seconds per multiply-add, per quantized value and per layer, and the two weights in
    multiply-adds."""
    parts = np.array([[r['macs'], r['quantized_values'], r['layers']] for r in rows], dtype=float)
    seconds = np.array([r['seconds_per_step'] for r in rows])
    per_mac, per_value, per_layer = np.linalg.lstsq(parts, seconds, rcond=None)[0]
    for row, predicted in zip(rows, parts @ np.array([per_mac, per_value, per_layer])):
        row['fit_over_measured'] = float(predicted / row['seconds_per_step'])
    today = np.array([r['work'] for r in rows])
    ratio = float(np.sum(today * seconds) / np.sum(today * today))  # seconds per unit of today's work
    for row in rows:
        row['today_over_measured'] = float(ratio * row['work'] / row['seconds_per_step'])
    return {'element_work': float(per_value / per_mac), 'layer_work': float(per_layer / per_mac),
            'today': {'element_work': ELEMENT_WORK, 'layer_work': LAYER_WORK}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS, choices=sorted(ZOO))
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', default='results/distillation_step_cost')
    args = parser.parse_args(argv)
    if len(args.models) < 3:
        parser.error('the fit has three unknowns: give at least three models')
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.models:
        rows.append(measure(key, args.steps))
        print(f"{key}: {rows[-1]['seconds_per_step']:.3f} s per step", flush=True)
    weights = fit(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {'command': 'python tools/distillation_step_cost.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
              'date': datetime.datetime.now().isoformat(timespec='seconds'), 'machine': platform.platform(),
              'torch_threads': args.threads, 'steps': args.steps, 'fit': weights, 'models': rows}
    (out / 'distillation_step_cost.json').write_text(json.dumps(record, indent=2))
    print(f"fit: ELEMENT_WORK {weights['element_work']:.0f}, LAYER_WORK {weights['layer_work']:.3g} "
          f"(today {ELEMENT_WORK:.0f}, {LAYER_WORK:.3g})")
    print('| model | s per step | work (G) | steps given | fit / measured | today / measured |')
    print('|---|---:|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['model']} | {r['seconds_per_step']:.3f} | {r['work'] / 1e9:.2f} | {r['steps_given']} | "
              f"{r['fit_over_measured']:.2f} | {r['today_over_measured']:.2f} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
