#!/usr/bin/env python
"""The quality ladder on the real x4 checkpoints: baselines, the method's stages, other bit widths.

Every configuration is quantized from the pretrained weights, calibrated (and searched/finetuned) on
SunHays80 crops only, and measured on Set5 and Set14: PSNR and SSIM on the Y channel with a border of
``scale`` pixels cropped (BasicSR's ``calculate_psnr``/``calculate_ssim``), mean colour shift against the
ground truth (CIELAB Delta E) and fidelity PSNR against the float network's own output. Each configuration
runs in a fresh process, so its peak resident memory is its own.

    python tools/benchmark.py --out results/benchmark                       # every model, every rung
    python tools/benchmark.py --models imdn_x4 --rungs minmax full --ft-iters 100 --out /tmp/bench

Writes ``benchmark.json`` (one record per model and rung, appended as each finishes, so an interrupted
run keeps what it measured) and ``benchmark.md`` into ``--out``. Nothing is tuned on Set5/Set14.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

MODELS = ('imdn_x4', 'rfdn_x4', 'pan_x4', 'carn_m_x4', 'fsrcnn_x4', 'srvgg_x4')
TEST_SETS = ('Set5', 'Set14')

_FT = {'enabled': True}
_NO_SEARCH = {'enabled': False}
# Neither block reconstruction nor distillation (the rungs measured before either existed).
_NO_RECON = {'reconstruction': {'enabled': False}, 'distillation': {'enabled': False}}
# Block reconstruction without distillation.
_RECON = {'reconstruction': {'enabled': True}, 'distillation': {'enabled': False}}
# (rung key, label, oaq overrides). Fully-quantized protocol and paper level allocation throughout; every rung
# but ``paper`` and the ``default*`` ones names its stages, so that a change of the default recipe does
# not change what a labelled rung runs. The finetuning length comes from --ft-iters.
RUNGS = {
    'default': ('W4A4 default recipe', {}),
    'default_w8a8': ('W8A8 default recipe', {'w_bits': 8, 'a_bits': 8}),
    'paper': ('W4A4 paper preset (dual-region + SAFT, per-tensor weights)', {'preset': 'paper'}),
    'default_lattice': ('W4A4 default recipe, integer lattice', {'integer_lattice': True}),
    'default_w8a8_lattice': ('W8A8 default recipe, integer lattice', {'w_bits': 8, 'a_bits': 8,
                                                                      'integer_lattice': True}),
    'minmax': ('W4A4 MinMax', {'act_quantizer': 'minmax', 'search': _NO_SEARCH, **_NO_RECON}),
    'percentile': ('W4A4 Percentile', {'act_quantizer': 'percentile', 'search': _NO_SEARCH,
                                       **_NO_RECON}),
    'mse': ('W4A4 MSE', {'act_quantizer': 'mse', 'search': _NO_SEARCH, **_NO_RECON}),
    'mse_ft': ('W4A4 MSE + vanilla FT', {'act_quantizer': 'mse', 'search': _NO_SEARCH, **_NO_RECON,
                                         'finetune': {**_FT, 'mode': 'vanilla'}}),
    'dual': ('W4A4 dual-region', {'search': _NO_SEARCH, **_NO_RECON}),
    'dual_search': ('W4A4 dual-region + search', {**_NO_RECON}),
    'dual_search_vft': ('W4A4 dual-region + search + vanilla FT', {**_NO_RECON,
                                                                   'finetune': {**_FT, 'mode': 'vanilla'}}),
    'full': ('W4A4 full method (dual-region + search + SAFT)', {**_NO_RECON,
                                                                'finetune': {**_FT, 'mode': 'sensitivity'}}),
    'dual_search_rounding': ('W4A4 dual-region + search + learned rounding (beyond the paper)',
                             {'rounding': {'enabled': True}, **_NO_RECON}),
    'full_rounding': ('W4A4 full method + learned rounding (beyond the paper)',
                      {'rounding': {'enabled': True}, **_NO_RECON,
                       'finetune': {**_FT, 'mode': 'sensitivity'}}),
    'full_rounding_zero': ('W4A4 full method + learned rounding + zero-level weight grid (beyond the paper)',
                           {'weight_grid': 'zero', 'rounding': {'enabled': True}, **_NO_RECON,
                            'finetune': {**_FT, 'mode': 'sensitivity'}}),
    'dual_search_recon': ('W4A4 dual-region + search + block reconstruction (beyond the paper)',
                          {**_RECON, 'finetune': {'enabled': False}}),
    'full_recon': ('W4A4 full method + block reconstruction (beyond the paper)',
                   {**_RECON, 'finetune': {**_FT, 'mode': 'sensitivity'}}),
    'full_w8a8': ('W8A8 full method', {'w_bits': 8, 'a_bits': 8, **_NO_RECON,
                                       'finetune': {**_FT, 'mode': 'sensitivity'}}),
    'full_w6a6': ('W6A6 full method', {'w_bits': 6, 'a_bits': 6, **_NO_RECON,
                                       'finetune': {**_FT, 'mode': 'sensitivity'}}),
    'full_w3a3': ('W3A3 full method', {'w_bits': 3, 'a_bits': 3, **_NO_RECON,
                                       'finetune': {**_FT, 'mode': 'sensitivity'}}),
    'full_pwlq': ('W4A5 full method, pwlq levels (4-bit weights, 2^5 activation codes)',
                  {'levels': 'pwlq', **_NO_RECON, 'finetune': {**_FT, 'mode': 'sensitivity'}}),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='results/benchmark', help='folder for benchmark.json and benchmark.md')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
    parser.add_argument('--rungs', nargs='+', default=['fp'] + list(RUNGS), choices=['fp'] + list(RUNGS),
                        help='configurations to run (fp: the float network)')
    parser.add_argument('--ft-iters', type=int, default=500,
                        help='finetuning iterations in all (split over the configured epochs, at least one each)')
    parser.add_argument('--ft-epochs', type=int, default=10, help='finetuning epochs')
    parser.add_argument('--ft-patch', type=int, default=None,
                        help='finetuning LR crop size (default: the config default, 96 as in the paper)')
    parser.add_argument('--sets', nargs='+', default=list(TEST_SETS), choices=TEST_SETS)
    parser.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1), help='torch CPU threads')
    parser.add_argument('--shared', default=None, help='shared data folder (default: OAQ_SHARED or ../shared)')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rung_config(rung: str, args: argparse.Namespace) -> dict:
    """The oaq option dict of a rung, finetuning lengths filled in from the command line."""
    overrides = json.loads(json.dumps(RUNGS[rung][1]))
    if overrides.get('preset') == 'paper':
        overrides['finetune'] = {}  # the preset's finetuning, at the length the command line gives
    finetune = overrides.get('finetune')
    if finetune is not None:
        epochs = max(1, min(args.ft_epochs, args.ft_iters))
        finetune.update(epochs=epochs, iters_per_epoch=max(1, args.ft_iters // epochs))
        if args.ft_patch is not None:
            finetune['patch_size'] = args.ft_patch
    return overrides


# ----------------------------------------------------------------------------------------------- worker

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def to_bgr_uint8(tensor):
    import numpy as np
    image = tensor.detach().squeeze(0).clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1]
    return (image * 255.0).round().astype(np.uint8)


def test_pairs(shared: Path, name: str, scale: int):
    """``(image name, LR tensor, HR BGR uint8)`` of a benchmark set."""
    import cv2

    from oaq_plugin.pipeline.io.images import read_image
    root = shared / 'data' / 'benchmark' / name
    pairs = []
    for hr_path in sorted((root / 'HR').glob('*.png')):
        lr_path = root / 'LR_bicubic' / f'X{scale}' / f'{hr_path.stem}x{scale}.png'
        pairs.append((hr_path.stem, read_image(lr_path)[None], cv2.imread(str(hr_path), cv2.IMREAD_COLOR)))
    return pairs


def evaluate(net, fp_net, pairs, scale: int) -> Dict[str, float]:
    """Mean PSNR/SSIM (Y, crop = scale), Delta E against the ground truth and fidelity PSNR against ``fp_net``."""
    import numpy as np
    import torch
    from basicsr.metrics.psnr_ssim import calculate_psnr, calculate_ssim

    from oaq_plugin.pipeline.metrics.image_quality import mean_delta_e
    values: Dict[str, List[float]] = {'psnr': [], 'ssim': [], 'delta_e': [], 'fidelity_psnr': []}
    with torch.no_grad():
        for _, lr, hr in pairs:
            out = to_bgr_uint8(net(lr))
            hr = hr[:out.shape[0], :out.shape[1]]
            values['psnr'].append(calculate_psnr(out, hr, scale, test_y_channel=True))
            values['ssim'].append(calculate_ssim(out, hr, scale, test_y_channel=True))
            crop = (slice(scale, -scale), slice(scale, -scale))
            values['delta_e'].append(mean_delta_e(out[crop][:, :, ::-1] / 255.0, hr[crop][:, :, ::-1] / 255.0))
            if fp_net is not None:
                reference = to_bgr_uint8(fp_net(lr))
                values['fidelity_psnr'].append(calculate_psnr(out, reference, scale, test_y_channel=True))
    return {k: float(np.mean(v)) for k, v in values.items() if v}


def iteration_seconds(net, batch_size: int, patch: int, scale: int, repeats: int = 5) -> float:
    """Median seconds of one forward + backward of ``net`` on random patches (after one warm-up)."""
    import statistics

    import torch
    generator = torch.Generator().manual_seed(0)
    lr = torch.rand(batch_size, 3, patch, patch, generator=generator)
    target = torch.rand(batch_size, 3, patch * scale, patch * scale, generator=generator)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = (net(lr) - target).abs().mean()
        loss.backward()
        if i:
            times.append(time.perf_counter() - start)
        net.zero_grad(set_to_none=True)
    return statistics.median(times)


def iteration_cost(report, model, settings, scale: int) -> dict:
    """A training stage's iterations and the seconds of one, against one float training iteration of
    ``model`` on the stage's batch (``settings.batch_size`` crops of ``settings.patch_size``)."""
    fp_seconds = iteration_seconds(model.train(), settings.batch_size, settings.patch_size, scale)
    model.eval()
    return {'iterations': report.iterations, 'seconds_per_iteration': report.seconds_per_iteration,
            'fp_iteration_s': fp_seconds, 'student_vs_fp': report.seconds_per_iteration / fp_seconds}


def run_worker(spec: dict) -> dict:
    import torch

    from oaq_plugin.compat import install_basicsr_compat
    install_basicsr_compat()
    from oaq_plugin import OAQConfig, run_pipeline
    from oaq_plugin.archs.zoo import ZOO, build_zoo_model
    from oaq_plugin.pipeline.io.images import read_image
    from oaq_plugin.pipeline.io.patches import PatchSource

    torch.set_num_threads(spec['threads'])
    shared = Path(spec['shared'])
    entry = ZOO[spec['model']]
    model = build_zoo_model(spec['model'], shared)
    base_rss = peak_rss_mb()
    record: dict = {'model': spec['model'], 'rung': spec['rung'],
                    'label': 'FP32' if spec['rung'] == 'fp' else RUNGS[spec['rung']][0]}
    sets = {name: test_pairs(shared, name, entry.scale) for name in spec['sets']}
    if spec['rung'] == 'fp':
        start = time.perf_counter()
        record['metrics'] = {name: evaluate(model, None, pairs, entry.scale) for name, pairs in sets.items()}
        record['timings'] = {'validate_s': time.perf_counter() - start}
    else:
        config = OAQConfig.from_dict(spec['config'])
        record['config'] = config.to_dict()
        calib_dir = shared / 'data' / 'calib' / 'SunHays80' / 'LR_bicubic' / f'X{entry.scale}'
        source = PatchSource([read_image(p) for p in sorted(calib_dir.glob('*.png'))])
        result = run_pipeline(model, source, config)
        qmodel = result.model
        start = time.perf_counter()
        record['metrics'] = {name: evaluate(qmodel, model, pairs, entry.scale) for name, pairs in sets.items()}
        record['timings'] = {**result.timings, 'validate_s': time.perf_counter() - start}
        record['equalized_pairs'] = len(result.equalized)
        from oaq_plugin.pipeline.stages.base import UnitReport
        for name, report in result.reports.items():
            data = report.to_dict()
            record[name] = {k: v for k, v in data.items() if k.startswith('relative_error_')}
            if isinstance(report, UnitReport) and report.entries and hasattr(report.entries[0], 'kept'):
                record[name][f'{report.ENTRIES}_kept'] = sum(entry.kept for entry in report.entries)
                record[name][report.ENTRIES] = len(report.entries)
        ft = result.reports.get('finetune')
        if ft is not None:
            record['finetune'] = iteration_cost(ft, model, config.finetune, entry.scale)
        distilled = result.reports.get('distillation')
        if distilled is not None and distilled.iterations:
            record['distillation'] = {'kept': distilled.kept, 'gain_db': distilled.derived()['gain_db'],
                                      **iteration_cost(distilled, model, config.distillation, entry.scale)}
    record['peak_rss_mb'] = peak_rss_mb()
    record['model_rss_mb'] = base_rss
    return record


# ----------------------------------------------------------------------------------------------- driver

def environment(args: argparse.Namespace) -> dict:
    import torch
    return {'date': datetime.datetime.now().isoformat(timespec='seconds'), 'python': platform.python_version(),
            'torch': torch.__version__, 'machine': f'{platform.machine()}, {os.cpu_count()} CPUs',
            'threads': args.threads, 'command': ' '.join(['python', 'tools/benchmark.py'] + sys.argv[1:])}


def run_one(spec: dict, out: Path) -> dict:
    """Run one configuration in a fresh interpreter; its record, or an error record."""
    spec_file = out / f".spec_{spec['model']}_{spec['rung']}.json"
    result_file = spec_file.with_suffix('.result.json')
    spec_file.write_text(json.dumps(spec))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, '--worker', str(spec_file)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    spec_file.unlink()
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {'model': spec['model'], 'rung': spec['rung'], 'error': ' | '.join(tail), 'wall_s': wall}
    record = json.loads(result_file.read_text())
    result_file.unlink()
    record['wall_s'] = wall
    return record


def _iteration_detail(stage: str):
    """(header suffix, cell suffix from a record) of a training stage's timing cell."""
    return (' (iters, student/FP iter)',
            lambda r: f" ({r[stage]['iterations']}, {r[stage]['student_vs_fp']:.2f}x)"
            if r.get(stage, {}).get('iterations') else '')


# What a stage's timing cell adds from the record (a stage not named here shows its seconds only).
STAGE_DETAILS = {stage: _iteration_detail(stage) for stage in ('finetune', 'distillation')}


def markdown(payload: dict) -> List[str]:
    from oaq_plugin.pipeline.run import stage_names
    stages = stage_names()
    env = payload['environment']
    sets = payload['sets']
    lines = [f"Quality ladder, {env['date']}, {env['machine']}, torch {env['torch']}, {env['threads']} threads",
             f"Command: `{env['command']}`", '',
             'PSNR/SSIM: Y channel, border of `scale` pixels cropped; Delta E: mean CIELAB distance to the ground '
             'truth (same crop); fidelity: PSNR-Y against the float output. Calibration, search and finetuning on '
             'SunHays80 only.',
             f"Finetuned rungs: {payload['ft_iters']} iterations, LR crops of "
             f"{payload['ft_patch'] or 'the default size (96)'}, batch 2; calibration: 6 batches of 16 crops (96 px).",
             '']
    header = '| model | configuration | ' + ' | '.join(f'{s} PSNR / SSIM | {s} dE | {s} fidelity' for s in sets) + \
        ''.join(f" | {name} s{STAGE_DETAILS.get(name, ('', None))[0]}" for name in stages) + ' | peak RSS MiB |'
    lines += [header, '|' + '---|' * (header.count('|') - 1)]
    for r in payload['records']:
        if 'error' in r:
            lines.append(f"| {r['model']} | {r['rung']} | failed: {r['error'][:120]} |")
            continue
        cells = []
        for s in sets:
            m = r['metrics'].get(s, {})
            fid = f"{m['fidelity_psnr']:.2f}" if 'fidelity_psnr' in m else ''
            cells += [f"{m['psnr']:.2f} / {m['ssim']:.4f}", f"{m['delta_e']:.3f}", fid]
        t = r.get('timings', {})
        for name in stages:
            seconds = t.get(f'{name}_s')
            detail = STAGE_DETAILS.get(name, ('', lambda r: ''))[1](r)
            cells.append(f'{seconds:.0f}{detail}' if seconds else '')
        lines.append(f"| {r['model']} | {r['label']} | " + ' | '.join(cells) + f" | {r['peak_rss_mb']:.0f} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        record = run_worker(spec)
        Path(args.worker).with_suffix('.result.json').write_text(json.dumps(record))
        return 0
    from oaq_plugin.paths import shared_root
    shared = Path(args.shared) if args.shared else shared_root()
    if not (shared / 'weights').is_dir():
        print(f'benchmark: shared data not found at {shared} (pass --shared or set OAQ_SHARED)', file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {'environment': environment(args), 'sets': args.sets, 'ft_iters': args.ft_iters,
               'ft_patch': args.ft_patch, 'records': []}
    for model in args.models:
        for rung in args.rungs:
            spec = {'model': model, 'rung': rung, 'threads': args.threads, 'shared': str(shared), 'sets': args.sets,
                    'config': None if rung == 'fp' else rung_config(rung, args)}
            record = run_one(spec, out)
            payload['records'].append(record)
            summary = record.get('error') or ' '.join(
                f"{s} {record['metrics'][s]['psnr']:.2f}" for s in args.sets if s in record.get('metrics', {}))
            print(f"[{datetime.datetime.now():%H:%M:%S}] {model} {rung}: {summary} ({record['wall_s']:.0f} s)",
                  flush=True)
            (out / 'benchmark.json').write_text(json.dumps(payload, indent=2) + '\n')
            (out / 'benchmark.md').write_text('\n'.join(markdown(payload)) + '\n')
    failed = [r for r in payload['records'] if 'error' in r]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
