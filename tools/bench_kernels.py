#!/usr/bin/env python
"""Speed of the Triton quantized conv against cuDNN, per layer and end to end (EDSR x4), on one GPU.

Writes ``bench_kernels.json`` and ``bench_kernels.md`` into ``--out``. Every Triton timing comes with the
relative error of its output against the integer reference (``oaq_plugin.backends.reference``).

    python tools/bench_kernels.py --out results/bench_kernels          # the measurement; needs CUDA
    python tools/bench_kernels.py --sizes --out results/bench_sizes    # checkpoint sizes, FP32 vs W8/W4 (CPU)
    python tools/bench_kernels.py --check-on-cpu --out /tmp/bench      # every code path on tiny shapes in the
                                                                       # Triton interpreter; timings meaningless

Exit status: 0 done, 1 a Triton output disagreed with the reference, 2 no CUDA device (speed mode).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

# (batch, in channels, height, width, out channels, kernel): EDSR-baseline on a 320x180 LR frame.
LAYER_SHAPES = {
    'EDSR body conv 3x3 64->64': (1, 64, 180, 320, 64, 3),
    'EDSR upsampler conv 3x3 64->256': (1, 64, 180, 320, 256, 3),
}
CPU_CHECK_SHAPES = {
    'tiny conv 3x3 16->16': (1, 16, 5, 6, 16, 3),
    'tiny conv 3x3 16->64': (1, 16, 5, 6, 64, 3),
}
# End-to-end networks: EDSR-baseline x4 (BasicSR's arch) and IMDN x4 (this package's), random weights.
EDSR = dict(arch='EDSR', num_feat=64, num_block=16, size=(180, 320))
IMDN = dict(arch='IMDN', num_feat=64, num_block=6, size=(180, 320))
CPU_CHECK_EDSR = dict(arch='EDSR', num_feat=16, num_block=1, size=(6, 5))
CPU_CHECK_IMDN = dict(arch='IMDN', num_feat=16, num_block=1, size=(6, 5))
BITS = {'W8A8': (8, 8), 'W4A4': (4, 4)}
# Block configurations tried per Triton case on the GPU: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
SWEEP = [(64, 64, 32, 4, 2), (128, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 8, 3),
         (128, 128, 32, 8, 3), (256, 64, 32, 8, 3)]
TOLERANCE = 1e-5
FEATURE_SCALE = 15.0  # EDSR features on a 0-255 input scale sit mostly inside +-50 ...
OUTLIER_RANGE = (100.0, 270.0)  # ... with rare values out to about +-270 (METHOD.md section 1).


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='results/bench_kernels', help='folder for the JSON and markdown results')
    parser.add_argument('--warmup', type=int, default=10, help='untimed runs before timing')
    parser.add_argument('--repeats', type=int, default=100, help='timed runs (the median is reported)')
    parser.add_argument('--precisions', nargs='+', default=['ieee', 'tf32x3'],
                        help='tl.dot input precisions of the Triton runs (ieee, tf32x3, tf32)')
    parser.add_argument('--no-sweep', action='store_true', help='time only the default block configuration')
    parser.add_argument('--no-e2e', action='store_true', help='skip the end-to-end EDSR x4 and IMDN x4 timings')
    parser.add_argument('--no-layers', action='store_true', help='skip the single-layer timings')
    parser.add_argument('--sizes', action='store_true', help='measure checkpoint sizes (CPU) instead of speed')
    parser.add_argument('--checkpoint', default=None,
                        help='SRVGGNetCompact checkpoint for --sizes (default: the shared realesr-animevideov3.pth)')
    parser.add_argument('--check-on-cpu', action='store_true',
                        help='run every path on tiny shapes in the Triton interpreter (no meaningful timings)')
    return parser.parse_args(argv)


class CudaTimer:
    """Median of CUDA-event times; a large buffer is rewritten before each run so L2 starts cold."""

    def __init__(self, warmup: int, repeats: int) -> None:
        import torch
        self.warmup, self.repeats = warmup, repeats
        self.flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device='cuda')

    def __call__(self, fn: Callable[[], object]) -> Dict[str, float]:
        import torch
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) for s, e in events])


class WallTimer:
    """Wall-clock timing for the CPU check (the interpreter's times say nothing about a GPU)."""

    def __init__(self, warmup: int, repeats: int) -> None:
        self.warmup, self.repeats = warmup, repeats

    def __call__(self, fn: Callable[[], object]) -> Dict[str, float]:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return summarize(times)


def summarize(times_ms: List[float]) -> Dict[str, float]:
    ordered = sorted(times_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {'median_ms': statistics.median(ordered), 'p10_ms': pick(0.1), 'p90_ms': pick(0.9), 'runs': len(ordered)}


def feature_map(shape, device, seed: int = 0):
    """Gaussian features with 0.5 % outliers of either sign, like EDSR's inner activations."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * FEATURE_SCALE
    outliers = torch.rand(shape, generator=generator) < 0.005
    low, high = OUTLIER_RANGE
    magnitude = torch.empty(shape).uniform_(low, high, generator=generator)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return torch.where(outliers, magnitude * sign, x).to(device)


def quantized_conv(conv, calibration, w_bits: int, a_bits: int):
    """``conv`` as a calibrated quantized layer at ``w_bits``/``a_bits`` (dual-region, paper levels)."""
    import torch
    from oaq_plugin import OAQConfig, quantize
    config = OAQConfig.from_dict({'search': {'enabled': False}, 'layer_bits': {'*': [w_bits, a_bits]}})
    return quantize(torch.nn.Sequential(conv), [calibration], config)[0]


def relative_error(actual, expected) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def bench_layers(shapes, timer, device, precisions, sweep: bool) -> List[dict]:
    import torch
    import torch.nn.functional as F
    from oaq_plugin.backends.reference import reference_forward
    from oaq_plugin.backends.triton_backend import TritonExecutor
    from oaq_plugin.kernels.quant_conv2d import default_blocks, quant_conv2d

    rows = []
    for name, (n, c, h, w, oc, k) in shapes.items():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(c, oc, k, padding=k // 2).to(device).eval()
        x = feature_map((n, c, h, w), device).contiguous(memory_format=torch.channels_last)
        common = {'case': name, 'input': [n, c, h, w], 'out_channels': oc, 'kernel': k}
        with torch.no_grad():
            for label, dtype, tf32 in (('cuDNN fp32', torch.float32, False), ('cuDNN tf32', torch.float32, True),
                                       ('cuDNN fp16', torch.float16, False)):
                if device == 'cpu' and tf32:
                    continue
                xi = x.to(dtype)
                wi = conv.weight.to(dtype).contiguous(memory_format=torch.channels_last)
                bi = conv.bias.to(dtype)
                previous = torch.backends.cudnn.allow_tf32
                torch.backends.cudnn.allow_tf32 = tf32
                try:
                    stats = timer(lambda: F.conv2d(xi, wi, bi, padding=k // 2))
                except RuntimeError as error:  # e.g. fp16 conv missing on some CPU builds
                    rows.append({**common, 'backend': label, 'error': str(error).splitlines()[0]})
                    continue
                finally:
                    torch.backends.cudnn.allow_tf32 = previous
                rows.append({**common, 'backend': label, 'bits': 'float', **stats})

            for bits_label, (w_bits, a_bits) in BITS.items():
                layer = quantized_conv(conv, x[..., : max(8, h // 4), : max(8, w // 4)], w_bits, a_bits)
                expected = reference_forward(layer, x, torch.float64)
                # The unfused PyTorch path: codes, table lookup, dequantized weight, then a true-fp32 conv.
                previous = torch.backends.cudnn.allow_tf32
                torch.backends.cudnn.allow_tf32 = False
                try:
                    stats = timer(lambda: reference_forward(layer, x, torch.float32))
                finally:
                    torch.backends.cudnn.allow_tf32 = previous
                rows.append({**common, 'backend': 'PyTorch unfused (decode + fp32 conv)', 'bits': bits_label, **stats})
                weight, grid = TritonExecutor().prepare(layer)
                m = n * h * w
                for precision in precisions:
                    default = default_blocks(m, oc, c, precision) + (4, 2)
                    configs = [default] + ([cfg for cfg in SWEEP if cfg != default] if sweep else [])
                    best = None
                    for cfg in configs:
                        blocks, warps, stages = cfg[:3], cfg[3], cfg[4]

                        def run(blocks=blocks, warps=warps, stages=stages, precision=precision):
                            return quant_conv2d(x, weight, grid, padding=k // 2, precision=precision, blocks=blocks,
                                                num_warps=warps, num_stages=stages)
                        try:
                            error = relative_error(run(), expected)
                        except Exception as failure:  # a block config can exceed shared memory: skip it
                            rows.append({**common, 'backend': 'triton', 'bits': bits_label, 'precision': precision,
                                         'config': list(cfg), 'error': f'{type(failure).__name__}: {failure}'})
                            continue
                        stats = timer(run)
                        result = {**common, 'backend': 'triton', 'bits': bits_label, 'precision': precision,
                                  'config': list(cfg), 'default_config': cfg == default,
                                  'relative_error': error, 'ok': error < TOLERANCE, **stats}
                        if cfg == default:
                            rows.append({**result, 'selection': 'default'})
                        if best is None or stats['median_ms'] < best['median_ms']:
                            best = result
                    if best is not None and len(configs) > 1:
                        rows.append({**best, 'selection': 'best of sweep'})
    return rows


def end_to_end_model(settings: dict):
    """``(network, case name)`` for an end-to-end settings dict (random weights, seed 0)."""
    import torch
    torch.manual_seed(0)
    h, w = settings['size']
    if settings['arch'] == 'EDSR':
        from oaq_plugin.compat import install_basicsr_compat
        install_basicsr_compat()
        from basicsr.archs.edsr_arch import EDSR as EDSRArch
        model = EDSRArch(3, 3, num_feat=settings['num_feat'], num_block=settings['num_block'], upscale=4)
        return model.eval(), f"EDSR x4 num_feat={settings['num_feat']} num_block={settings['num_block']} on {w}x{h}"
    from oaq_plugin.archs import IMDN as IMDNArch
    model = IMDNArch(num_feat=settings['num_feat'], num_block=settings['num_block'], upscale=4)
    return model.eval(), f"IMDN x4 num_feat={settings['num_feat']} num_block={settings['num_block']} on {w}x{h}"


def bench_network(settings: dict, timer, device, precisions) -> List[dict]:
    import copy

    import torch
    from oaq_plugin import OAQConfig, quantize
    from oaq_plugin.backends.reference import ReferenceExecutor
    from oaq_plugin.backends.select import backend_summary, to_backend
    from oaq_plugin.quant import quant_layers

    model, case = end_to_end_model(settings)
    model = model.to(device)
    h, w = settings['size']
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    common = {'case': case, 'input': [1, 3, h, w]}
    rows = []
    with torch.no_grad():
        for label, dtype, tf32 in (('cuDNN fp32', torch.float32, False), ('cuDNN tf32', torch.float32, True),
                                   ('cuDNN fp16', torch.float16, False)):
            if device == 'cpu' and (tf32 or dtype == torch.float16):
                continue
            net = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last)
            xi = x.to(dtype).contiguous(memory_format=torch.channels_last)
            previous = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                rows.append({**common, 'backend': label, 'bits': 'float', **timer(lambda: net(xi))})
            finally:
                torch.backends.cudnn.allow_tf32 = previous

        calibration = [torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(i)).to(device)
                       for i in range(2)]
        for bits_label, (w_bits, a_bits) in BITS.items():
            config = OAQConfig.from_dict({'search': {'enabled': False}, 'w_bits': w_bits, 'a_bits': a_bits})
            qmodel = quantize(model, calibration, config)
            to_backend(qmodel, 'reference')
            expected = qmodel(x)
            # Timed like the layer rows: the unfused PyTorch path with a true-fp32 conv per layer.
            for _, layer in quant_layers(qmodel):
                layer.executor = ReferenceExecutor(torch.float32)
            previous = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                stats = timer(lambda: qmodel(x))
            finally:
                torch.backends.cudnn.allow_tf32 = previous
            rows.append({**common, 'backend': 'PyTorch unfused (decode + fp32 conv)', 'bits': bits_label,
                         'protocol': config.protocol, **stats})
            for precision in precisions:
                to_backend(qmodel, 'triton', precision=precision)
                out = qmodel(x)
                error = relative_error(out, expected)
                on_triton = sum(v == 'triton' for v in backend_summary(qmodel).values())
                rows.append({**common, 'backend': 'triton', 'bits': bits_label, 'protocol': config.protocol,
                             'precision': precision, 'triton_layers': on_triton,
                             'quantized_layers': len(backend_summary(qmodel)), 'relative_error': error,
                             # Requantizing every layer input can flip a code where values sit on a rounding
                             # boundary, so whole-network outputs are compared with a looser bound.
                             'ok': error < 1e-3, **timer(lambda: qmodel(x))})
    return rows


def environment(device: str, command: str) -> dict:
    import torch
    info = {'command': command, 'date': datetime.datetime.now().isoformat(timespec='seconds'),
            'torch': torch.__version__, 'python': platform.python_version()}
    try:
        import triton
        info['triton'] = triton.__version__
    except ImportError:
        info['triton'] = None
    if device == 'cuda':
        info['device'] = torch.cuda.get_device_name()
        info['cuda'] = torch.version.cuda
        info['cudnn'] = torch.backends.cudnn.version()
    else:
        info['device'] = f'CPU ({platform.processor() or platform.machine()}), Triton interpreter'
    return info


def speed_table(rows: List[dict], reference_key: str = 'cuDNN fp32') -> List[str]:
    lines = ['| case | backend | bits | dot precision | config (BM, BN, BK, warps, stages) | median ms | p10 | p90 | '
             'vs cuDNN fp32 | rel. error |', '|---|---|---|---|---|---:|---:|---:|---:|---:|']
    baseline = {r['case']: r['median_ms'] for r in rows if r.get('backend') == reference_key and 'median_ms' in r}
    for r in rows:
        if 'median_ms' not in r:
            lines.append(f"| {r['case']} | {r['backend']} | {r.get('bits', '')} | {r.get('precision', '')} | "
                         f"{r.get('config', '')} | failed: {r.get('error', '')} | | | | |")
            continue
        speedup = baseline.get(r['case'])
        speedup = f'{speedup / r["median_ms"]:.2f}x' if speedup else ''
        backend = r['backend'] + (f" ({r['selection']})" if r.get('selection') else '')
        error = f"{r['relative_error']:.1e}" if 'relative_error' in r else ''
        lines.append(f"| {r['case']} | {backend} | {r.get('bits', '')} | {r.get('precision', '')} | "
                     f"{tuple(r['config']) if 'config' in r else ''} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | "
                     f"{r['p90_ms']:.3f} | {speedup} | {error} |")
    return lines


def write_results(out: Path, name: str, payload: dict, markdown: List[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{name}.json').write_text(json.dumps(payload, indent=2) + '\n')
    (out / f'{name}.md').write_text('\n'.join(markdown) + '\n')
    print('\n'.join(markdown))
    print(f'\nwritten: {out / (name + ".json")}, {out / (name + ".md")}')


def run_speed(args: argparse.Namespace) -> int:
    import torch
    device = 'cpu' if args.check_on_cpu else 'cuda'
    if device == 'cuda':
        torch.backends.cudnn.benchmark = True
        timer = CudaTimer(args.warmup, args.repeats)
        shapes, networks, sweep = LAYER_SHAPES, (EDSR, IMDN), not args.no_sweep
    else:
        timer = WallTimer(0, 1)
        shapes, networks, sweep = CPU_CHECK_SHAPES, (CPU_CHECK_EDSR, CPU_CHECK_IMDN), False
    info = environment(device, args.command)
    layers = [] if args.no_layers else bench_layers(shapes, timer, device, args.precisions, sweep)
    end_to_end = []
    if not args.no_e2e:
        for settings in networks:
            try:
                end_to_end += bench_network(settings, timer, device, args.precisions)
            except ImportError as missing:  # EDSR needs basicsr; IMDN is this package's own arch
                end_to_end.append({'case': f"{settings['arch']} x4", 'backend': 'all', 'error': str(missing)})
    failed = [r for r in layers + end_to_end if r.get('ok') is False]
    markdown = [f"Kernel speed on {info['device']} ({info['date']}; torch {info['torch']}, triton {info['triton']})",
                f"Command: `python tools/{info['command']}`; medians of {timer.repeats} runs after {timer.warmup} "
                'warm-up runs (CUDA events, L2 flushed before each run)' if device == 'cuda' else
                'CPU check in the Triton interpreter: timings are NOT speed measurements', '']
    markdown += (speed_table(layers) + [''] if layers else []) + (speed_table(end_to_end) if end_to_end else [])
    if failed:
        markdown += ['', f'{len(failed)} Triton run(s) disagreed with the reference beyond the tolerance.']
    write_results(Path(args.out), 'bench_kernels', {'environment': info, 'tolerance': TOLERANCE, 'layers': layers,
                                                    'end_to_end': end_to_end}, markdown)
    return 1 if failed else 0


def run_sizes(args: argparse.Namespace) -> int:
    import torch
    from oaq_plugin import OAQConfig
    from oaq_plugin.compat import install_basicsr_compat
    from oaq_plugin.paths import shared_path
    from oaq_plugin.pipeline.export import float_size_bytes, quantized_size_bytes, save_quantized
    from oaq_plugin.quant import convert
    install_basicsr_compat()
    from basicsr.archs.srvgg_arch import SRVGGNetCompact

    checkpoint = Path(args.checkpoint) if args.checkpoint else \
        shared_path('weights', 'SRVGGNetCompact', 'realesr-animevideov3.pth')
    if not checkpoint.is_file():
        print(f'bench_kernels: checkpoint not found: {checkpoint} (pass --checkpoint or set OAQ_SHARED)',
              file=sys.stderr)
        return 2
    arch = dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4, act_type='prelu')
    model = SRVGGNetCompact(**arch).eval()
    model.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=True)['params'])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32_file = out / 'srvgg_fp32_state_dict.pth'
    torch.save(model.state_dict(), fp32_file)
    rows = [{'model': 'FP32 state dict (torch.save)', 'file_bytes': fp32_file.stat().st_size,
             'tensor_bytes': float_size_bytes(model)},
            {'model': f'FP32 release file ({checkpoint.name})', 'file_bytes': checkpoint.stat().st_size,
             'tensor_bytes': float_size_bytes(model)}]
    variants = {
        'W8A8 (all layers 8-bit)': {'w_bits': 8, 'a_bits': 8},
        'W4A4, full protocol (first/last/upsampler W8A8)': {'w_bits': 4, 'a_bits': 4},
        'W4A4, every layer 4-bit': {'w_bits': 4, 'a_bits': 4, 'layer_bits': {'*': [4, 4]}},
    }
    # Sizes do not depend on calibrated values, so the converted (uncalibrated) model is saved directly.
    for (label, options), file_name in zip(variants.items(), ('w8a8', 'w4a4_full', 'w4a4_all')):
        config = OAQConfig.from_dict({'search': {'enabled': False}, **options})
        qmodel = convert(model, config, torch.rand(1, 3, 8, 8))
        path = save_quantized(qmodel, out / f'srvgg_{file_name}.pth', config,
                              arch={'type': 'SRVGGNetCompact', **arch})
        rows.append({'model': label, 'file_bytes': path.stat().st_size, 'tensor_bytes': quantized_size_bytes(qmodel)})
    base = rows[0]['file_bytes']
    info = environment('cpu', args.command)
    info['device'] = 'CPU'
    markdown = [f"Checkpoint sizes, SRVGGNetCompact x4 ({checkpoint.name}), {info['date']}",
                f"Command: `python tools/{info['command']}`", '',
                '| model | file bytes | vs FP32 state dict file | tensor bytes |', '|---|---:|---:|---:|']
    markdown += [f"| {r['model']} | {r['file_bytes']:,} | {r['file_bytes'] / base:.3f} | {r['tensor_bytes']:,} |"
                 for r in rows]
    write_results(out, 'bench_sizes', {'environment': info, 'checkpoint': str(checkpoint), 'rows': rows}, markdown)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    args.command = ' '.join(['bench_kernels.py'] + list(sys.argv[1:] if argv is None else argv))
    if args.check_on_cpu:
        # Must be set before any Triton kernel is defined.
        os.environ['TRITON_INTERPRET'] = '1'
    if args.sizes:
        return run_sizes(args)
    import torch
    if not args.check_on_cpu and not torch.cuda.is_available():
        print('bench_kernels: no CUDA device here; the speed benchmark needs an NVIDIA GPU. '
              'Use --sizes for checkpoint sizes, or --check-on-cpu to exercise the script in the '
              'Triton interpreter.', file=sys.stderr)
        return 2
    return run_speed(args)


if __name__ == '__main__':
    sys.exit(main())
