"""Generality of the ``oaq`` CLI: small random instances of ten spandrel architectures, quantized end to end.

Usage::

    python tools/spandrel_generality.py [--bits w8a8 w4a4] [--cases compact rcan ...] [--json PATH]

Each instance is built with spandrel's own class (random weights, seeded), saved as a state dict, and run
through ``oaq quantize`` with the default recipe on a tiny image world this script writes (6 calibration
images of 40x48 px; a test set of 2 HR images of 64x80 px and their x2 LR): calibration 2 batches of 2
patches of 24 px. It prints one markdown row per instance (fidelity PSNR-Y of the quantized against the
float output, uint8; mean Delta E; the share of multiply-adds left in float) and writes every report's
numbers to a JSON file (default ``docs/bench/spandrel_generality_<time>.json``). The test suite
(``tests/test_spandrel_archs.py``) builds the same instances.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from spandrel.architectures.Compact import Compact
from spandrel.architectures.DAT import DAT
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.HAT import HAT
from spandrel.architectures.OmniSR import OmniSR
from spandrel.architectures.PLKSR import RealPLKSR
from spandrel.architectures.RCAN import RCAN
from spandrel.architectures.SAFMN import SAFMN
from spandrel.architectures.SPAN import SPAN
from spandrel.architectures.SwinIR import SwinIR
from torch import nn


def _cases() -> Dict[str, Tuple[str, Callable[[], nn.Module]]]:
    """``{case: (spandrel architecture id, constructor)}``: one per kind of network."""
    return {
        # plain CNN with PReLU and a pixel shuffle, plus the upsampled input (Real-ESRGAN's Compact)
        'compact': ('Compact', lambda: Compact(num_feat=16, num_conv=4, upscale=2)),
        # residual-in-residual dense blocks (ESRGAN)
        'esrgan': ('ESRGAN', lambda: ESRGAN(num_filters=16, num_blocks=1, scale=2)),
        # efficient CNN with parameter-free attention (SPAN)
        'span': ('SPAN', lambda: _image_range_span(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2))),
        # spatially-adaptive feature modulation: depthwise convs, a LayerNorm, adaptive pooling (SAFMN)
        'safmn': ('SAFMN', lambda: SAFMN(dim=16, n_blocks=2, upscaling_factor=2)),
        # large-kernel CNN with group norm and partial convs (RealPLKSR)
        'realplksr': ('PLKSR', lambda: RealPLKSR(dim=16, n_blocks=2, upscaling_factor=2, kernel_size=7)),
        # channel-attention residual groups (RCAN)
        'rcan': ('RCAN', lambda: RCAN(scale=2, n_resgroups=2, n_resblocks=2, n_feats=16, reduction=4)),
        # shifted-window transformer (SwinIR)
        'swinir': ('SwinIR', lambda: SwinIR(img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                                             mlp_ratio=2.0, upscale=2, upsampler='pixelshuffle')),
        # hybrid attention: window attention, overlapping cross-attention, channel attention (HAT)
        'hat': ('HAT', lambda: HAT(img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                                   compress_ratio=3, squeeze_factor=3, mlp_ratio=2.0, upscale=2, num_feat=16)),
        # dual aggregation transformer: spatial and channel self-attention (DAT)
        'dat': ('DAT', lambda: DAT(img_size=16, embed_dim=32, split_size=[2, 4], depth=[2], num_heads=[2],
                                   expansion_factor=2.0, upscale=2)),
        # omni self-attention with window and grid attention (OmniSR)
        'omnisr': ('OmniSR', lambda: OmniSR(num_feat=16, block_num=1, window_size=4, up_scale=2)),
    }


def _image_range_span(model: nn.Module) -> nn.Module:
    """SPAN scales its input by 255 and has no division at the end: a trained SPAN's last conv maps back to
    [0, 1], a random one outputs values of +-30 that the uint8 output clips almost everywhere, so a fidelity
    measured on it would measure the random init. Its last conv is scaled by 1/255 and centred on grey, as
    training would, so that the output is an image and fidelity compares like with like."""
    last = model.upsampler[0]
    with torch.no_grad():
        last.weight.div_(255.0)
        last.bias.div_(255.0).add_(0.45)
    return model


CASES = _cases()
SCALE = 2


def save_random_instance(case: str, folder: Path, seed: int = 0) -> Path:
    """Build ``case`` with spandrel's class (random weights, seeded) and save its state dict as ``<case>.pth``."""
    torch.manual_seed(seed)
    model = CASES[case][1]()
    path = Path(folder) / f'{case}.pth'
    torch.save(model.state_dict(), path)
    return path


def smooth_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An HWC uint8 image of smooth colour blobs with a few edges (closer to a photograph than noise is)."""
    low = rng.random((max(height // 8, 2), max(width // 8, 2), 3)).astype(np.float32)
    import cv2
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    y, x = np.mgrid[0:height, 0:width]
    image += 0.25 * ((x + 2 * y) % 23 < 4)[..., None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_image_world(root: Path, calib_images: int = 6, test_images: int = 2, scale: int = SCALE,
                      seed: int = 0) -> Dict[str, Path]:
    """Calibration LR images and a paired test set (HR, and its bicubic LR as ``<name>x<scale>.png``)."""
    import cv2
    rng = np.random.default_rng(seed)
    folders = {'calib': root / 'calib', 'hr': root / 'test' / 'HR', 'lr': root / 'test' / f'LR_x{scale}'}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(calib_images):
        cv2.imwrite(str(folders['calib'] / f'calib{index}.png'), smooth_image(40, 48, rng))
    for index in range(test_images):
        hr = smooth_image(32 * scale, 40 * scale, rng)
        cv2.imwrite(str(folders['hr'] / f'img{index}.png'), hr)
        lr = cv2.resize(hr, (40, 32), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folders['lr'] / f'img{index}x{scale}.png'), lr)
    return folders


def measure(cases: Sequence[str], bits: Sequence[str], root: Path) -> List[dict]:
    """Run ``oaq quantize`` on each instance at each width; one record per run (its report's numbers)."""
    from oaq_plugin.cli.main import main
    folders = write_image_world(root)
    records = []
    for case in cases:
        checkpoint = save_random_instance(case, root)
        for width in bits:
            out = root / 'results' / f'{case}_{width}'
            start = time.perf_counter()
            code = main(['quantize', str(checkpoint), '--calib', str(folders['calib']), '--bits', width, '--quiet',
                         '--test', f"Tiny={folders['hr']}:{folders['lr']}", '--out', str(out), '--backend',
                         'reference', '--set', 'calib.num_batches=2', '--set', 'calib.batch_size=2', '--set',
                         'calib.patch_size=24'])
            if code != 0:
                raise SystemExit(f'{case} {width}: oaq quantize failed with exit code {code}')
            report = json.loads((out / 'oaq_report.json').read_text())
            tiny = report['datasets']['Tiny']
            shares = report.get('macs_by_bits') or {}
            records.append({
                'case': case, 'architecture': CASES[case][0], 'bits': width,
                'parameters': sum(p.numel() for p in CASES[case][1]().parameters()),
                'fidelity_psnr': tiny['fidelity_psnr'], 'delta_e': tiny['delta_e'],
                'float_macs_share': (shares.get('float') or {}).get('share', 0.0),
                'float_ops': len(report.get('float_ops') or []),
                'quantized_layers': len(report['layers']), 'seconds': round(time.perf_counter() - start, 1),
            })
            print(f"{case} {width}: fidelity {tiny['fidelity_psnr']:.2f} dB", file=sys.stderr, flush=True)
    return records


def markdown(records: Sequence[dict], bits: Sequence[str]) -> str:
    """One row per instance: parameters, fidelity and Delta E per width, float share of multiply-adds."""
    header = ['instance', 'spandrel arch', 'params'] + [f'{w.upper()} fidelity (dB)' for w in bits] + \
        [f'{w.upper()} ΔE' for w in bits] + ['float MACs']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * 2 + '---:|' * (len(header) - 2)]
    for case in dict.fromkeys(r['case'] for r in records):
        rows = {r['bits']: r for r in records if r['case'] == case}
        first = next(iter(rows.values()))
        cells = [case, first['architecture'], f"{first['parameters'] / 1000:.0f} k"]
        cells += [f"{rows[w]['fidelity_psnr']:.2f}" if w in rows else '-' for w in bits]
        cells += [f"{rows[w]['delta_e']:.2f}" if w in rows else '-' for w in bits]
        cells.append(f"{100 * first['float_macs_share']:.1f}%")
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bits', nargs='+', default=['w8a8', 'w4a4'])
    parser.add_argument('--cases', nargs='+', choices=sorted(CASES), default=list(CASES))
    parser.add_argument('--json', type=Path, help='where to write the numbers (default docs/bench/...)')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix='oaq_generality_') as folder:
        records = measure(args.cases, args.bits, Path(folder))
    table = markdown(records, args.bits)
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread, '
               f'torch {torch.__version__}')
    path = args.json or Path('docs/bench') / f"spandrel_generality_{datetime.datetime.now():%Y%m%d_%H%M}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'command': 'python tools/spandrel_generality.py ' + ' '.join(argv or sys.argv[1:]),
                                'machine': machine, 'date': f'{datetime.date.today()}', 'records': records,
                                'table': table}, indent=2))
    print(table)
    print(f'numbers: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
