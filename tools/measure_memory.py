#!/usr/bin/env python
"""Peak resident memory of IMDN inference on a 2K frame (2048x1080 LR), whole and tiled, float and W4A4,
and of calibration with 8 against 80 calibration images.

Each measurement runs in a fresh process. The process builds the network (and quantizes it: W4A4
dual-region, search off, on 2 batches of 8 SunHays80 crops of 48 px), loads its input, then resets the
kernel's high-water mark of its resident set (``/proc/self/clear_refs``) and runs the measured phase
under ``torch.no_grad()``. Reported per measurement: the resident set before the phase (``rss_setup``),
its peak during the phase (``VmHWM``), the difference, and ``ru_maxrss`` of the whole process. The parent
samples the child's memory and stops it at ``--timeout`` seconds or at ``--max-rss-gib`` (lowered to
leave 2 GiB of the machine's available memory), recording the peak reached so far.

    python tools/measure_memory.py --out results/memory
    python tools/measure_memory.py --only fp_tiled_2k calib_8_images_6_batches --out /tmp/memory

Writes ``memory.json`` and ``memory.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

CALIB_FOLDER = 'data/calib/SunHays80/LR_bicubic/X4'
GIB = 2 ** 30

# name -> what the child does. kind: inference (model, path, size, tile) or calibrate (images, batches).
MEASUREMENTS: Dict[str, Dict[str, Any]] = {
    'fp_whole_1k': {'kind': 'inference', 'model': 'imdn_x4', 'path': 'fp', 'size': (1024, 540), 'tile': 0},
    'w4a4_whole_1k': {'kind': 'inference', 'model': 'imdn_x4', 'path': 'fake', 'size': (1024, 540), 'tile': 0},
    'fp_whole_2k': {'kind': 'inference', 'model': 'imdn_x4', 'path': 'fp', 'size': (2048, 1080), 'tile': 0},
    'w4a4_whole_2k': {'kind': 'inference', 'model': 'imdn_x4', 'path': 'fake', 'size': (2048, 1080), 'tile': 0},
    'fp_tiled_2k': {'kind': 'inference', 'model': 'imdn_x4', 'path': 'fp', 'size': (2048, 1080), 'tile': 256},
    'w4a4_tiled_2k': {'kind': 'inference', 'model': 'imdn_x4', 'path': 'fake', 'size': (2048, 1080), 'tile': 256},
    # The default calibration (6 batches of 16 patches of 96 px) drawn from 8 or from 80 images.
    'calib_8_images_6_batches': {'kind': 'calibrate', 'model': 'imdn_x4', 'images': 8, 'batches': 6},
    'calib_80_images_6_batches': {'kind': 'calibrate', 'model': 'imdn_x4', 'images': 80, 'batches': 6},
    # Calibration work growing with the images (one batch per 8 images): 1 against 10 batches.
    'calib_8_images_1_batch': {'kind': 'calibrate', 'model': 'imdn_x4', 'images': 8, 'batches': 1},
    'calib_80_images_10_batches': {'kind': 'calibrate', 'model': 'imdn_x4', 'images': 80, 'batches': 10},
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='results/memory', help='folder for memory.json and memory.md')
    parser.add_argument('--only', nargs='+', choices=list(MEASUREMENTS), help='run only these measurements')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads in each measurement')
    parser.add_argument('--tile-pad', type=int, default=16, help='LR pixels of context around each tile')
    parser.add_argument('--timeout', type=float, default=180.0,
                        help='seconds a whole-image measurement may run (tiled and calibration: 4x this)')
    parser.add_argument('--max-rss-gib', type=float, default=14.0, help='stop a measurement above this resident set')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    parser.add_argument('--child-out', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- the measured process -----------------------------------------------------------------------------
def proc_status_kib(pid: str = 'self') -> Dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of a process, in KiB (empty when it is gone)."""
    values = {}
    try:
        with open(f'/proc/{pid}/status') as stream:
            for line in stream:
                key = line.split(':', 1)[0]
                if key in ('VmRSS', 'VmHWM'):
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values


def reset_high_water_mark() -> bool:
    """Reset this process's ``VmHWM`` to its current resident set (Linux >= 4.0)."""
    try:
        with open('/proc/self/clear_refs', 'w') as stream:
            stream.write('5')
        return True
    except OSError:
        return False


def ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_images(shared: Path, count: int) -> List[Any]:
    from oaq_plugin.pipeline.io.images import read_image
    return [read_image(f) for f in sorted((shared / CALIB_FOLDER).glob('*.png'))[:count]]


def frame(shared: Path, width: int, height: int):
    """The first calibration image resized (bicubic) to ``width`` x ``height``: 1 x 3 x H x W in [0, 1]."""
    import cv2
    import torch
    image = cv2.imread(str(sorted((shared / CALIB_FOLDER).glob('*.png'))[0]))[:, :, ::-1]
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC).astype('float32') / 255.
    return torch.from_numpy(image.clip(0, 1)).permute(2, 0, 1).contiguous()[None]


def run_child(name: str, spec: Dict[str, Any], threads: int, tile_pad: int, out: Path) -> None:
    import torch
    from oaq_plugin.archs.zoo import build_zoo_model, get_zoo_entry
    from oaq_plugin.paths import shared_root
    from oaq_plugin.pipeline.run import run_pipeline
    torch.set_num_threads(threads)
    shared = shared_root()
    model = build_zoo_model(spec['model'], shared)
    scale = int(get_zoo_entry(spec['model']).kwargs['upscale'])
    record: Dict[str, Any] = {'name': name, **spec, 'threads': threads}

    if spec['kind'] == 'inference':
        from oaq_plugin.backends.select import to_backend
        from oaq_plugin.pipeline.inference import run_tiled
        net = model
        if spec['path'] != 'fp':
            from oaq_plugin.pipeline.io.patches import PatchSource
            crops = PatchSource(calibration_images(shared, 8)).batches(2, 8, 48, seed=0)
            net = run_pipeline(model, crops, {'w_bits': 4, 'a_bits': 4, 'search': {'enabled': False}}).model
            to_backend(net, spec['path'])
        x = frame(shared, *spec['size'])
        record.update(tile_pad=tile_pad if spec['tile'] else None, scale=scale)

        def phase() -> None:
            with torch.no_grad():
                out_tensor = run_tiled(net, x, scale, spec['tile'], tile_pad)
            record['output_shape'] = list(out_tensor.shape)
    else:
        from oaq_plugin.experiment.calibration_data import calibration_source
        from oaq_plugin.config import OAQConfig
        config = OAQConfig.from_dict({'calib': {'dataroot_lq': str(shared / CALIB_FOLDER), 'num_images': spec['images'],
                                                'num_batches': spec['batches']}, 'search': {'enabled': False}})
        record.update(batch_size=config.calib.batch_size, patch_size=config.calib.patch_size)

        def phase() -> None:
            # What OAQModel does: a lazily loaded pool, its fixed batches, then convert and calibrate.
            source = calibration_source(config.calib)
            with torch.no_grad():
                run_pipeline(model, source, config)
            record['pool_images'] = len(source)

    gc.collect()
    setup = proc_status_kib()
    record['rss_setup_mib'] = setup.get('VmRSS', 0) / 1024
    record['hwm_reset'] = reset_high_water_mark()
    out.write_text(json.dumps({**record, 'status': 'running'}))
    start = time.perf_counter()
    phase()
    record['seconds'] = time.perf_counter() - start
    after = proc_status_kib()
    peak = after.get('VmHWM', 0) / 1024 if record['hwm_reset'] else ru_maxrss_mib()
    record.update(status='ok', peak_rss_mib=peak, delta_mib=peak - record['rss_setup_mib'],
                  ru_maxrss_mib=ru_maxrss_mib())
    out.write_text(json.dumps(record))


# -- the parent ---------------------------------------------------------------------------------------
def available_gib() -> Optional[float]:
    try:
        with open('/proc/meminfo') as stream:
            for line in stream:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def measure(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    spec = MEASUREMENTS[name]
    limit = args.timeout if spec['kind'] == 'inference' and spec['tile'] == 0 else 4 * args.timeout
    available = available_gib()
    cap_gib = args.max_rss_gib if available is None else min(args.max_rss_gib, available - 2.0)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / 'record.json'
        log_path = Path(folder) / 'log.txt'
        command = [sys.executable, __file__, '--child', name, '--child-out', str(out), '--threads', str(args.threads),
                   '--tile-pad', str(args.tile_pad)]
        start = time.monotonic()
        with open(log_path, 'w') as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        sampled_peak_kib, stopped, hwm = 0, None, 0.0
        while process.poll() is None:
            status = proc_status_kib(str(process.pid))
            sampled_peak_kib = max(sampled_peak_kib, status.get('VmRSS', 0))
            if status.get('VmRSS', 0) > cap_gib * 2 ** 20:
                stopped = f'resident set above {cap_gib:.1f} GiB'
            elif time.monotonic() - start > limit:
                stopped = f'still running after {limit:.0f} s'
            if stopped:
                hwm = status.get('VmHWM', 0) / 1024
                process.send_signal(signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.2)
        log = log_path.read_text(errors='replace')
        record = json.loads(out.read_text()) if out.is_file() else {'name': name, **spec}
    record['wall_s'] = time.monotonic() - start
    if stopped:
        record.update(status='stopped', reason=stopped, peak_rss_mib_at_stop=hwm,
                      delta_mib_at_stop=hwm - record.get('rss_setup_mib', 0.0))
    elif record.get('status') != 'ok':
        record.update(status='failed', log_tail=log[-2000:])
    record['parent_sampled_peak_rss_mib'] = sampled_peak_kib / 1024
    return record


def describe(record: Dict[str, Any]) -> str:
    if record['kind'] == 'calibrate':
        batches = f"{record['batches']} batch{'es' if record['batches'] > 1 else ''}"
        return (f"calibration, {record['images']} images, {batches} of "
                f"{record.get('batch_size', 16)}x{record.get('patch_size', 96)}^2")
    width, height = record['size']
    path = 'FP32' if record['path'] == 'fp' else f"W4A4 ({record['path']})"
    how = f"tiles {record['tile']} + pad {record.get('tile_pad')}" if record['tile'] else 'whole image'
    return f"{record['model']} {path}, {width}x{height}, {how}"


def markdown(records: List[Dict[str, Any]], header: Dict[str, Any]) -> str:
    malloc = ' '.join(f'{k}={v}' for k, v in header['malloc_env'].items())
    lines = [f"Measured {header['date']} on {header['machine']}; command `{header['command']}`"
             + (f' with {malloc}' if malloc else '') + '.', '',
             '| measurement | status | seconds | RSS before (MiB) | peak RSS (MiB) | peak - before (MiB) '
             '| ru_maxrss (MiB) |',
             '|---|---|---:|---:|---:|---:|---:|']
    for r in records:
        if r['status'] == 'ok':
            lines.append(f"| {describe(r)} | ok | {r['seconds']:.0f} | {r['rss_setup_mib']:.0f} "
                         f"| {r['peak_rss_mib']:.0f} | {r['delta_mib']:.0f} | {r['ru_maxrss_mib']:.0f} |")
        elif r['status'] == 'stopped':
            lines.append(f"| {describe(r)} | stopped: {r['reason']} | > {r['wall_s']:.0f} | "
                         f"{r.get('rss_setup_mib', 0):.0f} | ≥ {r['peak_rss_mib_at_stop']:.0f} | "
                         f"≥ {r['delta_mib_at_stop']:.0f} | |")
        else:
            lines.append(f"| {describe(r)} | failed | | | | | |")
    return '\n'.join(lines) + '\n'


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, MEASUREMENTS[args.child], args.threads, args.tile_pad, Path(args.child_out))
        return 0
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {
        'date': datetime.date.today().isoformat(),
        'machine': f'{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}',
        'command': 'python tools/measure_memory.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
        'torch': torch.__version__, 'python': platform.python_version(), 'threads': args.threads,
        'memory_available_gib_at_start': available_gib(),
        # glibc's allocator settings change how much freed memory stays resident (see docs/BENCHMARKS.md).
        'malloc_env': {k: v for k, v in os.environ.items() if k.startswith('MALLOC_')},
    }
    records = []
    for name in args.only or list(MEASUREMENTS):
        record = measure(name, args)
        records.append(record)
        print(f"{name}: {record['status']} " + ', '.join(
            f'{k} {record[k]:.0f}' for k in ('seconds', 'rss_setup_mib', 'peak_rss_mib', 'delta_mib',
                                              'peak_rss_mib_at_stop') if isinstance(record.get(k), float)),
              flush=True)
        (out / 'memory.json').write_text(json.dumps({**header, 'measurements': records}, indent=2))
    (out / 'memory.md').write_text(markdown(records, header))
    return 0 if all(r['status'] in ('ok', 'stopped') for r in records) else 1


if __name__ == '__main__':
    sys.exit(main())
