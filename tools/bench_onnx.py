#!/usr/bin/env python
"""Speed, peak memory and file size of quantized SR networks exported to ONNX and run by ONNX Runtime (CPU).

One 320x180 LR frame at x4 through each model, at each thread count, for these rows: ONNX Runtime fp32;
W8A8 uniform (MinMax activations, symmetric ``zero`` weight grid: the usual int8 setup); W8A8 dual-region;
W4A4 dual-region (all on the integer lattice, exported with ConvInteger/MatMulInteger where the grids
allow); PyTorch fp32. With ``--forms`` the W4A4 graph is also written in other forms (``exact`` rounding;
float convs on the decoded input) to show where the time goes. Each row runs in its own process (its peak
resident memory is that process's, ONNX Runtime rows without torch loaded): warm-up runs, then the median of
``--runs`` timed runs.

    python tools/bench_onnx.py --out docs/bench --name onnx_cpu_2core             # all models, 1 and 2 threads
    python tools/bench_onnx.py --models imdn_x4 srvgg_x4 --threads 1 --runs 20    # a shorter run
    python tools/bench_onnx.py --forms imdn_x4 srvgg_x4                           # + W4A4 graph forms there
    python tools/bench_onnx.py --models imdn_x4 srvgg_x4 --threads 1 --interleave --name onnx_interleaved
                                                                    # rows in turn in one process
    python tools/bench_onnx.py --models imdn_x4 --threads 1 --runs 3 --forms --profile --name onnx_ops
                                                                    # time per ONNX op type instead

Quantization here uses a small calibration (SunHays80 crops, no search): enough for the grids' shapes, which
are what the speed depends on; quality is measured elsewhere (docs/BENCHMARKS.md). EDSR-M has random weights.
Writes ``<name>.json`` and ``<name>.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

MODELS = ('imdn_x4', 'pan_x4', 'rfdn_x4', 'srvgg_x4', 'edsr_m_x4')
FRAME = (180, 320)
ROWS = {
    'ort_fp32': 'ONNX Runtime fp32',
    'ort_w8a8_uniform': 'ONNX Runtime W8A8 uniform (int8)',
    'ort_w8a8_dual': 'ONNX Runtime W8A8 dual-region',
    'ort_w4a4_dual': 'ONNX Runtime W4A4 dual-region',
    'ort_w4a4_dual_exact': 'W4A4 dual-region, exact rounding form',
    'ort_w4a4_dual_float_convs': 'W4A4 dual-region, float convs on decoded inputs',
    'torch_fp32': 'PyTorch fp32',
}
QUANTIZED = {
    'ort_w8a8_uniform': {'w_bits': 8, 'a_bits': 8, 'act_quantizer': 'minmax', 'weight_grid': 'zero'},
    'ort_w8a8_dual': {'w_bits': 8, 'a_bits': 8},
    'ort_w4a4_dual': {'w_bits': 4, 'a_bits': 4},
}
FORMS = {'ort_w4a4_dual': dict(rounding='sum', integer=True),
         'ort_w4a4_dual_exact': dict(rounding='exact', integer=True),
         'ort_w4a4_dual_float_convs': dict(rounding='sum', integer=False)}


def build_model(key: str):
    """The float network of ``key`` (zoo checkpoint, or EDSR-M x4 with random weights)."""
    import torch
    if key == 'edsr_m_x4':
        from basicsr.archs.edsr_arch import EDSR
        torch.manual_seed(0)
        return EDSR(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=16, upscale=4, res_scale=1,
                    img_range=255.0).eval()
    from oaq_plugin.archs.zoo import build_zoo_model
    return build_zoo_model(key)


def calibration_batches():
    from oaq_plugin.paths import shared_root
    from oaq_plugin.pipeline.io.images import read_image
    from oaq_plugin.pipeline.io.patches import PatchSource
    files = sorted((shared_root() / 'data/calib/SunHays80/LR_bicubic/X4').glob('*.png'))[:16]
    return PatchSource([read_image(p) for p in files]).batches(2, 8, 48, seed=0)


def export_all(key: str, folder: Path, forms: bool) -> Dict[str, Path]:
    """The ONNX files of every ONNX Runtime row of one model."""
    import warnings

    import torch

    from oaq_plugin import OAQConfig, export_onnx, quantize
    model = build_model(key)
    example = torch.rand(1, 3, 32, 32)
    files = {'ort_fp32': folder / f'{key}_fp32.onnx'}
    axes = {0: 'batch', 2: 'height', 3: 'width'}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (example,), str(files['ort_fp32']), dynamo=False, opset_version=17,
                          input_names=['input'], output_names=['output'],
                          dynamic_axes={'input': axes, 'output': axes})
    batches = calibration_batches()
    for row, options in QUANTIZED.items():
        config = OAQConfig.from_dict({**options, 'integer_lattice': True, 'search': {'enabled': False},
                                      'reconstruction': {'enabled': False}, 'distillation': {'enabled': False}})
        qmodel = quantize(model, batches, config)
        wanted = [form_row for form_row in FORMS if form_row == row or (forms and form_row.startswith(f'{row}_'))]
        for form_row in wanted or [row]:
            files[form_row] = export_onnx(qmodel, folder / f'{key}_{form_row}.onnx', example,
                                          **FORMS.get(form_row, {}))
    return files


def time_in_turn(calls: List[Callable[[], object]], warmup: int, runs: int) -> List[List[float]]:
    """Seconds of each call's timed runs, the calls made in turn (one each per round, ``warmup`` rounds
    untimed), so that every call sees the same load of a shared machine."""
    times: List[List[float]] = [[] for _ in calls]
    for round_index in range(warmup + runs):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            call()
            if round_index >= warmup:
                times[index].append(time.perf_counter() - start)
    return times


def measure(args) -> dict:
    """Child process: time one row and report its peak resident memory."""
    import numpy as np
    x = np.random.default_rng(0).random((1, 3) + FRAME, dtype=np.float32)
    if args.measure_torch:
        from oaq_plugin.compat import install_basicsr_compat
        install_basicsr_compat()
        import torch
        torch.set_num_threads(args.threads)
        model = build_model(args.measure_torch)
        tensor = torch.from_numpy(x)

        def run():
            with torch.no_grad():
                model(tensor)
    else:
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(args.measure, options, providers=['CPUExecutionProvider'])

        def run():
            session.run(None, {'input': x})
    (times,) = time_in_turn([run], args.warmup, args.runs)
    if args.profile_ops:
        return {'median_ms': 1000 * statistics.median(times), 'op_ms': op_profile(args.measure, args.threads, x)}
    return {'median_ms': 1000 * statistics.median(times), 'min_ms': 1000 * min(times),
            'max_ms': 1000 * max(times), 'runs': len(times),
            'peak_rss_mb': peak_rss_mb()}


def measure_interleaved(paths: List[str], threads: int, warmup: int, runs: int) -> List[dict]:
    """Child process: the ONNX files run in turn, one run each per round, so that every file sees the same
    load of a shared machine (rows timed one after the other do not)."""
    import numpy as np
    import onnxruntime
    x = np.random.default_rng(0).random((1, 3) + FRAME, dtype=np.float32)
    sessions = []
    for path in paths:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        sessions.append(onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider']))
    times = time_in_turn([lambda session=session: session.run(None, {'input': x}) for session in sessions],
                         warmup, runs)
    return [{'median_ms': 1000 * statistics.median(t), 'min_ms': 1000 * min(t), 'max_ms': 1000 * max(t),
             'runs': len(t)} for t in times]


def op_profile(path: str, threads: int, x, runs: int = 3) -> Dict[str, float]:
    """Milliseconds per run spent in each ONNX op type (ONNX Runtime's profiler), largest first."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / 'bench_onnx_profile')
    session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    session.run(None, {'input': x})
    for _ in range(runs):
        session.run(None, {'input': x})
    trace = Path(session.end_profiling())
    totals: Dict[str, float] = {}
    events = json.loads(trace.read_text())
    trace.unlink()
    for event in events:
        if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time'):
            op = event['args']['op_name']
            totals[op] = totals.get(op, 0.0) + event['dur'] / 1000 / (runs + 1)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited from the parent)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_description() -> dict:
    info = {'machine': platform.machine(), 'cores': os.cpu_count()}
    try:
        text = Path('/proc/cpuinfo').read_text()
        for line in text.splitlines():
            if line.startswith('model name'):
                info['model'] = line.split(':', 1)[1].strip()
            if line.startswith('flags'):
                flags = set(line.split(':', 1)[1].split())
                info['avx2'] = 'avx2' in flags
                info['avx512f'] = 'avx512f' in flags
                info['avx512_vnni'] = 'avx512_vnni' in flags
                info['avx_vnni'] = 'avx_vnni' in flags
                break
    except OSError:
        pass
    return info


def markdown(result: dict) -> str:
    threads = result['threads']
    headers = ' | '.join(f"{t} thread{'s' if t > 1 else ''} (ms)" for t in threads)
    lines = [f'| model | row | {headers} | vs ORT fp32 ({threads[0]} thr) | peak RSS (MB) | file (MB) |',
             '|---|---|' + '---:|' * (len(threads) + 3)]
    for key, rows in result['models'].items():
        base = rows.get('ort_fp32', {}).get(str(threads[0]), {}).get('median_ms')
        for row, per_thread in rows.items():
            medians = [per_thread.get(str(t), {}).get('median_ms') for t in threads]
            cells = [f'{m:.0f}' if m is not None else '-' for m in medians]
            ratio = f'{base / medians[0]:.2f}x' if base and medians[0] else '-'
            peak = max((per_thread[str(t)].get('peak_rss_mb', 0) for t in threads if str(t) in per_thread),
                       default=None)
            size = per_thread.get('file_mb')
            lines.append(f"| {key} | {ROWS[row]} | {' | '.join(cells)} | {ratio} | "
                         f"{f'{peak:.0f}' if peak else '-'} | {f'{size:.2f}' if size else '-'} |")
    profiles = [(key, row, per_thread[str(threads[0])]['op_ms']) for key, rows in result['models'].items()
                for row, per_thread in rows.items() if 'op_ms' in per_thread.get(str(threads[0]), {})]
    if profiles:
        lines += ['', f'Time per ONNX op type ({threads[0]} thread, ms per run; the largest six):', '',
                  '| model | row | ops |', '|---|---|---|']
        for key, row, ops in profiles:
            largest = ', '.join(f'{op} {ms:.0f}' for op, ms in list(ops.items())[:6])
            lines.append(f'| {key} | {ROWS[row]} | {largest} (total {sum(ops.values()):.0f}) |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
    parser.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    parser.add_argument('--runs', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--forms', nargs='*', default=None, metavar='MODEL',
                        help='also time the other W4A4 graph forms (for the models named, or all models)')
    parser.add_argument('--out', default='docs/bench')
    parser.add_argument('--name', default='onnx_cpu')
    parser.add_argument('--profile', action='store_true',
                        help='instead of timing, profile the ONNX Runtime rows (time per op type, 1 thread)')
    parser.add_argument('--interleave', action='store_true',
                        help='time the ONNX Runtime rows of a model in one process, in turn (fair under load; '
                             'no per-row memory)')
    parser.add_argument('--measure-many', nargs='+', help=argparse.SUPPRESS)
    parser.add_argument('--measure', help=argparse.SUPPRESS)
    parser.add_argument('--profile-ops', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--measure-torch', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_many:
        print(json.dumps(measure_interleaved(args.measure_many, args.threads[0], args.warmup, args.runs)))
        return 0
    if args.measure or args.measure_torch:
        args.threads = args.threads[0]
        print(json.dumps(measure(args)))
        return 0

    from oaq_plugin.compat import install_basicsr_compat
    install_basicsr_compat()
    import onnxruntime
    import torch
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        'command': 'python ' + ' '.join([sys.argv[0]] + sys.argv[1:]),
        'date': datetime.date.today().isoformat(), 'cpu': cpu_description(),
        'load_average_at_start': os.getloadavg(), 'onnxruntime': onnxruntime.__version__,
        'torch': torch.__version__, 'frame': list(FRAME), 'scale': 4, 'threads': args.threads,
        'runs': args.runs, 'warmup': args.warmup, 'models': {},
    }
    with tempfile.TemporaryDirectory() as folder:
        for key in args.models:
            print(f'{key}: exporting', flush=True)
            forms = args.forms is not None and (not args.forms or key in args.forms)
            files = export_all(key, Path(folder), forms)
            rows: Dict[str, dict] = {}
            if args.interleave:
                ort_rows = [row for row in ROWS if row in files]
                for row in ort_rows:
                    rows[row] = {'file_mb': files[row].stat().st_size / 2 ** 20}
                for threads in args.threads:
                    command = [sys.executable, __file__, '--threads', str(threads), '--runs', str(args.runs),
                               '--warmup', str(args.warmup), '--measure-many'] + [str(files[r]) for r in ort_rows]
                    done = subprocess.run(command, capture_output=True, text=True, check=True,
                                          env={**os.environ, 'OMP_NUM_THREADS': str(threads)})
                    for row, measured in zip(ort_rows, json.loads(done.stdout.strip().splitlines()[-1])):
                        rows[row][str(threads)] = measured
                        print(f"  {ROWS[row]:48s} {threads} thr {measured['median_ms']:9.1f} ms", flush=True)
            for row in ROWS if not args.interleave else ():
                if row not in files and row != 'torch_fp32':
                    continue
                rows[row] = {}
                if row in files:
                    rows[row]['file_mb'] = files[row].stat().st_size / 2 ** 20
                for threads in args.threads:
                    command = [sys.executable, __file__, '--threads', str(threads), '--runs', str(args.runs),
                               '--warmup', str(args.warmup)]
                    command += ['--measure-torch', key] if row == 'torch_fp32' else ['--measure', str(files[row])]
                    if args.profile:
                        if row == 'torch_fp32':
                            continue
                        command.append('--profile-ops')
                    done = subprocess.run(command, capture_output=True, text=True, check=True,
                                          env={**os.environ, 'OMP_NUM_THREADS': str(threads)})
                    rows[row][str(threads)] = json.loads(done.stdout.strip().splitlines()[-1])
                    print(f"  {ROWS[row]:48s} {threads} thr {rows[row][str(threads)]['median_ms']:9.1f} ms",
                          flush=True)
            result['models'][key] = rows
            result['load_average_at_end'] = os.getloadavg()
            (out / f'{args.name}.json').write_text(json.dumps(result, indent=1) + '\n')
            (out / f'{args.name}.md').write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
