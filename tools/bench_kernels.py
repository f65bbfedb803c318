#!/usr/bin/env python
"""Speed of the quantized Triton kernels against cuDNN (and TensorRT), per layer, end to end and for the whole
pipeline, on one GPU.

Writes ``<name>.json`` and ``<name>.md`` (``--name``, default ``bench_kernels``) into ``--out``. Every Triton
timing comes with the error of its output against the integer reference (``oaq_plugin.backends.reference``);
the int8 kernel's int32 accumulators are also compared with the exact integer products.

    python tools/bench_kernels.py --out results/bench_kernels          # the measurement; needs CUDA
    python tools/bench_kernels.py --no-layers --pipeline --out R       # end to end, then calibrate+search+recon
    python tools/bench_kernels.py --sizes --out results/bench_sizes    # checkpoint sizes, FP32 vs W8/W4 (CPU)
    python tools/bench_kernels.py --cpu-check --out /tmp/bench         # every code path and every correctness
                                                                       # check on tiny shapes in the Triton
                                                                       # interpreter; timings meaningless

``--cpu-check`` is ``--check-on-cpu --pipeline`` (all parts). Exit status: 0 done, 1 a Triton output disagreed
with the reference, 2 no CUDA device (speed mode).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
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
# End-to-end networks, random weights: EDSR-M x4 (BasicSR's EDSR, 64 features, 16 blocks), IMDN x4 (this
# package's) and SRVGG x4 (BasicSR's SRVGGNetCompact, 64 features, 16 convs, PReLU).
NETWORKS = {
    'EDSR-M': dict(arch='EDSR', num_feat=64, num_block=16),
    'IMDN': dict(arch='IMDN', num_feat=64, num_block=6),
    'SRVGG': dict(arch='SRVGG', num_feat=64, num_block=16),
}
CPU_CHECK_NETWORKS = {
    'EDSR-M': dict(arch='EDSR', num_feat=16, num_block=1),
    'IMDN': dict(arch='IMDN', num_feat=16, num_block=1),
    'SRVGG': dict(arch='SRVGG', num_feat=16, num_block=2),
}
# LR input sizes (height, width): a 320x180 frame and 1920x1080 / 4.
E2E_SIZES = {'320x180': (180, 320), '480x270': (270, 480)}
CPU_CHECK_SIZES = {'6x5': (5, 6)}
BITS = {'W8A8': (8, 8), 'W4A4': (4, 4)}
# Whole-network quantization settings of the end-to-end rows; W4A4 keeps first/last/upsampler at W8A8 (the
# full protocol), W4A4-all puts every layer at 4 bits.
E2E_VARIANTS = {
    'W8A8': {'w_bits': 8, 'a_bits': 8},
    'W4A4': {'w_bits': 4, 'a_bits': 4},
    'W4A4-all': {'w_bits': 4, 'a_bits': 4, 'layer_bits': {'*': [4, 4]}},
}
# int8 layer rows: weight bits and the input lattice (dual-region 4-bit on signed features; uniform 8-bit on
# rectified features, stored shifted by 128).
INT8_LAYER_BITS = {'W4A4': (4, 'dual_region'), 'W8A8': (8, 'uniform_unsigned')}
# Block configurations tried per Triton case on the GPU: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
SWEEP = [(64, 64, 32, 4, 2), (128, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 8, 3),
         (128, 128, 32, 8, 3), (256, 64, 32, 8, 3)]
INT8_SWEEP = [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 32, 4, 4),
              (256, 64, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4)]
TOLERANCE = 1e-5
INT8_TOLERANCE = 1e-6
NETWORK_TOLERANCE = 1e-3
# A grid with at most this many codes is snapped onto a lattice for the int8 rows when the quantizer itself
# does not give one; 8-bit grids stay as they are (their layers run on the fp32-product kernel).
SNAP_MAX_CODES = 64
SNAP_SPAN = 200
FEATURE_SCALE = 15.0  # EDSR features on a 0-255 input scale sit mostly inside +-50 ...
OUTLIER_RANGE = (100.0, 270.0)  # ... with rare values out to about +-270 (docs/METHOD.md).


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='results/bench_kernels', help='folder for the JSON and markdown results')
    parser.add_argument('--name', default='bench_kernels', help='file name (without suffix) of the results')
    parser.add_argument('--warmup', type=int, default=10, help='untimed runs before timing')
    parser.add_argument('--repeats', type=int, default=100, help='timed runs (the median is reported)')
    parser.add_argument('--e2e-repeats', type=int, default=None, help='timed runs of the end-to-end rows')
    parser.add_argument('--precisions', nargs='+', default=['ieee', 'tf32x3'],
                        help='tl.dot input precisions of the fp32-product Triton runs (ieee, tf32x3, tf32)')
    parser.add_argument('--no-sweep', action='store_true', help='time only the default block configuration')
    parser.add_argument('--no-e2e', action='store_true', help='skip the end-to-end network timings')
    parser.add_argument('--no-layers', action='store_true', help='skip the single-layer timings')
    parser.add_argument('--no-int8', action='store_true', help='skip the int8 lattice kernel rows')
    parser.add_argument('--networks', nargs='+', default=list(NETWORKS), choices=list(NETWORKS),
                        help='end-to-end networks')
    parser.add_argument('--e2e-sizes', nargs='+', default=list(E2E_SIZES), choices=list(E2E_SIZES),
                        help='end-to-end LR input sizes')
    parser.add_argument('--e2e-bits', nargs='+', default=None, choices=list(E2E_VARIANTS),
                        help='end-to-end quantization settings (default W8A8 W4A4; all of them with --cpu-check)')
    parser.add_argument('--pipeline', action='store_true',
                        help='also time calibrate + search + block reconstruction for IMDN x4 and EDSR-M x4')
    parser.add_argument('--calib-dir', default=None,
                        help='LR images for --pipeline (default: SunHays80 x4 under OAQ_SHARED if present, '
                             'else synthetic smooth images)')
    parser.add_argument('--sizes', action='store_true', help='measure checkpoint sizes (CPU) instead of speed')
    parser.add_argument('--checkpoint', default=None,
                        help='SRVGGNetCompact checkpoint for --sizes (default: the shared realesr-animevideov3.pth)')
    parser.add_argument('--check-on-cpu', action='store_true',
                        help='run the chosen parts on tiny shapes in the Triton interpreter (no meaningful timings)')
    parser.add_argument('--cpu-check', action='store_true',
                        help='--check-on-cpu with every part, the pipeline included: all correctness checks')
    args = parser.parse_args(argv)
    if args.cpu_check:
        args.check_on_cpu = True
        args.pipeline = True
    if args.e2e_bits is None:
        args.e2e_bits = list(E2E_VARIANTS) if args.cpu_check else ['W8A8', 'W4A4']
    return args


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
    config = OAQConfig.from_dict({'search': {'enabled': False}, 'reconstruction': {'enabled': False},
                                  'distillation': {'enabled': False},
                                  'layer_bits': {'*': [w_bits, a_bits]}})
    return quantize(torch.nn.Sequential(conv), [calibration], config, progress=False)[0]


def relative_error(actual, expected) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def with_tf32(enabled: bool, fn: Callable[[], object]):
    """``fn()`` with cuDNN/cuBLAS TF32 set to ``enabled``, restored afterwards."""
    import torch
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        return fn()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


# --- lattice grids for the int8 rows ------------------------------------------------------------------------------

def lattice_quantizer(kind: str, x):
    """An activation quantizer on an integer lattice fitted to the values ``x``.

    ``dual_region``: 4-bit paper levels, dense levels the odd multiples of ``unit = q99(|x|) / 7``, tails of
    three levels stepping whole units out to the extremes (at most 127 units). ``uniform_unsigned``: 8-bit
    uniform ``0..255`` units over ``[0, max x]``.
    """
    import torch
    from oaq_plugin.quant import DualRegionQuantizer, UniformQuantizer
    flat = x.detach().flatten().float()
    if kind == 'uniform_unsigned':
        unit = max(float(flat.max()), 1e-6) / 255
        quantizer = UniformQuantizer(8)
        quantizer.set_bounds(0.0, 255 * unit)
        return quantizer
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1 << 20].to(flat.device)]
    unit = max(float(torch.quantile(sample.abs(), 0.99)), 1e-6) / 7
    steps = [min(40, max(1, math.ceil((extreme / unit - 7) / 3))) for extreme in (-float(flat.min()),
                                                                                   float(flat.max()))]
    quantizer = DualRegionQuantizer(4)
    quantizer.set_bounds(-(7 + 3 * steps[0]) * unit, (7 + 3 * steps[1]) * unit)
    quantizer.set_breakpoint(7 * unit)
    return quantizer


def snap_to_lattice(qmodel) -> Dict[str, int]:
    """Give every quantized layer whose input grid is not a lattice (and has at most ``SNAP_MAX_CODES`` codes)
    a fixed grid on one: each region's offset and step rounded to whole units of ``span / SNAP_SPAN``.

    This is for timing only (the kernel's speed does not depend on where the levels sit); the quantization
    method's own lattice option is what gives lattice grids with a measured quality.
    """
    import torch
    from oaq_plugin.backends.int8_backend import integer_lattice
    from oaq_plugin.quant import quant_layers
    from oaq_plugin.quant.activation import ActivationQuantizer
    from oaq_plugin.quant.region_grid import Region, RegionGrid

    class FixedGridQuantizer(ActivationQuantizer):
        def __init__(self, grid: RegionGrid, bits: int) -> None:
            super().__init__(bits)
            self.fixed = grid
            self.observer = None

        def grid(self) -> RegionGrid:
            return self.fixed

    counts = {'lattice': 0, 'snapped': 0, 'other': 0}
    for _, layer in quant_layers(qmodel):
        grid = layer.act_quantizer.grid()
        if integer_lattice(grid)[0] is not None:
            counts['lattice'] += 1
            continue
        levels = grid.level_table().double()
        span = float(levels.max() - levels.min())
        if grid.num_codes > SNAP_MAX_CODES or span <= 0:
            counts['other'] += 1
            continue
        unit = span / SNAP_SPAN
        device = levels.device

        def snap(region):
            if region is None:
                return None
            offset = round(float(region.offset) / unit) * unit
            step = max(1, round(float(region.step) / unit)) * unit
            return Region(offset=torch.tensor(offset, dtype=torch.float32, device=device),
                          step=torch.tensor(step, dtype=torch.float32, device=device),
                          index_min=region.index_min, index_max=region.index_max)

        middle = snap(grid.middle)
        first, last = middle.levels()[0], middle.levels()[-1]
        snapped = RegionGrid(middle=middle, low=snap(grid.low), high=snap(grid.high),
                             low_threshold=first if grid.low is not None else None,
                             high_threshold=last if grid.high is not None else None)
        if integer_lattice(snapped)[0] is None:
            counts['other'] += 1
            continue
        layer.act_quantizer = FixedGridQuantizer(snapped, layer.act_quantizer.bits).to(device)
        counts['snapped'] += 1
    return counts


def throughput(ops: float, bytes_moved: float, ms: float) -> Dict[str, float]:
    """Achieved tera-ops/s and GB/s of a timing (for the profile: memory- or compute-bound)."""
    return {'tops': ops / (ms * 1e-3) / 1e12, 'gb_per_s': bytes_moved / (ms * 1e-3) / 1e9}


# --- per layer ----------------------------------------------------------------------------------------------------

def bench_layers(shapes, timer, device, precisions, sweep: bool, int8: bool) -> List[dict]:
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
                try:
                    stats = with_tf32(tf32, lambda: timer(lambda: F.conv2d(xi, wi, bi, padding=k // 2)))
                except RuntimeError as error:  # e.g. fp16 conv missing on some CPU builds
                    rows.append({**common, 'backend': label, 'error': str(error).splitlines()[0]})
                    continue
                rows.append({**common, 'backend': label, 'bits': 'float', **stats})
            rows += tensorrt_rows(conv, x, common, timer, device)

            for bits_label, (w_bits, a_bits) in BITS.items():
                layer = quantized_conv(conv, x[..., : max(8, h // 4), : max(8, w // 4)], w_bits, a_bits)
                expected = reference_forward(layer, x, torch.float64)
                # The unfused PyTorch path: codes, table lookup, dequantized weight, then a true-fp32 conv.
                stats = with_tf32(False, lambda: timer(lambda: reference_forward(layer, x, torch.float32)))
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
            if int8:
                for bits_label in INT8_LAYER_BITS:
                    rows += int8_layer_rows(conv, x, bits_label, common, timer, sweep)
    return rows


def int8_layer_rows(conv, x, bits_label: str, common: dict, timer, sweep: bool) -> List[dict]:
    """The int8 lattice kernel on one layer: checks, then the quantize / conv / fused / whole-layer timings."""
    import torch
    from oaq_plugin.backends.int8_backend import Int8Executor
    from oaq_plugin.backends.reference import reference_forward
    from oaq_plugin.kernels.int8_conv2d import (default_blocks, int8_conv2d, int8_conv2d_reference,
                                                lattice_quantize)

    w_bits, lattice_kind = INT8_LAYER_BITS[bits_label]
    if lattice_kind == 'uniform_unsigned':
        x = torch.relu(x)
    n, c, h, w = x.shape
    k = conv.kernel_size[0]
    layer = quantized_conv(conv, x[..., : max(8, h // 4), : max(8, w // 4)], w_bits, 8)
    layer.act_quantizer = lattice_quantizer(lattice_kind, x)
    executor = Int8Executor()
    weight, grid = executor.prepare(layer)
    base = {**common, 'backend': 'triton int8', 'bits': bits_label, 'lattice': lattice_kind,
            'input_zero': grid.zero}
    codes = lattice_quantize(x, grid)
    encoded = (grid.integers.long()[layer.act_quantizer.grid().encode(x)] - grid.zero).permute(0, 2, 3, 1)
    code_mismatches = int((codes.long() != encoded).sum())
    accumulators = int8_conv2d(codes, weight, grid, padding=k // 2, output='accumulators')
    exact = bool(torch.equal(accumulators, int8_conv2d_reference(codes, weight, grid, padding=k // 2,
                                                                 output='accumulators')))
    expected = reference_forward(layer, x, torch.float64)
    error = relative_error(executor(layer, x), expected)
    fused = dict(padding=k // 2, activation='relu', next_grid=grid, output='codes')
    agreement = float((int8_conv2d(codes, weight, grid, **fused) ==
                       int8_conv2d_reference(codes, weight, grid, **fused)).double().mean())
    checks = {'accumulators_exact': exact, 'input_code_mismatches': code_mismatches,
              'fused_code_agreement': agreement, 'relative_error': error,
              'ok': exact and error < INT8_TOLERANCE and code_mismatches == 0 and agreement == 1.0}
    m, oc = n * h * w, conv.out_channels
    ops = 2.0 * m * oc * c * k * k
    weight_bytes = weight.data.numel()
    rows = []
    stats = timer(lambda: lattice_quantize(x, grid))
    rows.append({**base, 'path': 'quantize fp32 -> int8 codes', **stats,
                 **throughput(0, x.numel() * 5, stats['median_ms'])})
    default = default_blocks(m, oc, c) + (4, 3)
    configs = [default] + ([cfg for cfg in INT8_SWEEP if cfg != default] if sweep else [])
    best = None
    for cfg in configs:
        def run(cfg=cfg):
            return int8_conv2d(codes, weight, grid, padding=k // 2, blocks=cfg[:3], num_warps=cfg[3],
                               num_stages=cfg[4])
        try:
            run()
        except Exception as failure:  # a block config can exceed shared memory: skip it
            rows.append({**base, 'path': 'conv int8 -> fp32', 'config': list(cfg),
                         'error': f'{type(failure).__name__}: {failure}'})
            continue
        stats = timer(run)
        if best is None or stats['median_ms'] < best[1]['median_ms']:
            best = (cfg, stats)
    if best is None:
        return rows
    cfg, stats = best
    launch = dict(blocks=cfg[:3], num_warps=cfg[3], num_stages=cfg[4])
    rows.append({**base, 'path': 'conv int8 -> fp32', 'config': list(cfg),
                 'selection': 'best of sweep' if len(configs) > 1 else 'default', **checks, **stats,
                 **throughput(ops, codes.numel() + weight_bytes + m * oc * 4, stats['median_ms'])})
    stats = timer(lambda: int8_conv2d(codes, weight, grid, **fused, **launch))
    rows.append({**base, 'path': 'fused conv int8 -> ReLU -> next int8 codes', 'config': list(cfg), **checks,
                 **stats, **throughput(ops, codes.numel() + weight_bytes + m * oc, stats['median_ms'])})
    whole = Int8Executor(*launch.values())
    stats = timer(lambda: whole(layer, x))
    rows.append({**base, 'path': 'layer fp32 -> quantize -> conv -> fp32', 'config': list(cfg), **checks,
                 **stats, **throughput(ops, x.numel() * 5 + codes.numel() + weight_bytes + m * oc * 4,
                                       stats['median_ms'])})
    return rows


# --- TensorRT -----------------------------------------------------------------------------------------------------

def tensorrt_rows(model, x, common: dict, timer, device, qmodel=None) -> List[dict]:
    """TensorRT fp16 from the float ``model``'s ONNX export or, given ``qmodel``, TensorRT int8 from the quantized
    model's ONNX export."""
    rows = []
    for label in (('TensorRT int8',) if qmodel is not None else ('TensorRT fp16',)):
        row = {**common, 'backend': label, 'bits': common.get('bits', 'float')}
        why = tensorrt_unavailable(device)
        if why is None and label.endswith('int8'):
            import oaq_plugin
            if not hasattr(oaq_plugin, 'export_onnx'):
                why = "the quantized model's ONNX export (oaq_plugin.export_onnx) is not in this checkout"
        if why is not None:
            rows.append({**row, 'skipped': why})
            continue
        try:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / 'model.onnx'
                if label.endswith('fp16'):
                    export_float_onnx(model, x, path)
                else:
                    import oaq_plugin
                    oaq_plugin.export_onnx(qmodel, path, x)
                run = tensorrt_runner(path, x, 'fp16' if label.endswith('fp16') else 'int8')
            rows.append({**row, **timer(run)})
        except Exception as failure:  # the engine build is the device's business; report and go on
            rows.append({**row, 'error': f'{type(failure).__name__}: {str(failure).splitlines()[0][:300]}'})
    return rows


def tensorrt_unavailable(device) -> Optional[str]:
    if device != 'cuda':
        return 'TensorRT needs a CUDA device'
    try:
        import tensorrt  # noqa: F401
    except ImportError as error:
        return f'the tensorrt package is not installed ({error})'
    return None


def export_float_onnx(model, x, path: Path) -> None:
    import torch
    model = copy.deepcopy(model).float().eval()
    try:
        torch.onnx.export(model, (x.float(),), str(path), input_names=['input'], output_names=['output'],
                          opset_version=17, dynamo=False)
    except TypeError:  # a torch without the ``dynamo`` switch
        torch.onnx.export(model, (x.float(),), str(path), input_names=['input'], output_names=['output'],
                          opset_version=17)


def tensorrt_runner(path: Path, x, precision: str) -> Callable[[], object]:
    """A callable running a TensorRT engine built from the ONNX file on ``x`` (fixed shape)."""
    import tensorrt as trt
    import torch
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes()):
        raise RuntimeError('; '.join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == 'int8':
        # The graph carries its own Q/DQ scales: explicit quantization, no calibrator.
        config.set_flag(trt.BuilderFlag.INT8)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError('TensorRT could not build the engine')
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
    feed = x.float().contiguous()
    context.set_input_shape(inputs[0], tuple(feed.shape))
    buffers = {inputs[0]: feed}
    for name in names:
        if name not in buffers:
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device='cuda')
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream

    def run():
        context.execute_async_v3(stream)
    return run


# --- end to end ---------------------------------------------------------------------------------------------------

def end_to_end_model(settings: dict):
    """``(network, case name)`` for an end-to-end settings dict (random weights, seed 0)."""
    import torch
    torch.manual_seed(0)
    if settings['arch'] == 'EDSR':
        from oaq_plugin.compat import install_basicsr_compat
        install_basicsr_compat()
        from basicsr.archs.edsr_arch import EDSR as EDSRArch
        model = EDSRArch(3, 3, num_feat=settings['num_feat'], num_block=settings['num_block'], upscale=4)
        return model.eval(), f"EDSR x4 num_feat={settings['num_feat']} num_block={settings['num_block']}"
    if settings['arch'] == 'SRVGG':
        from oaq_plugin.compat import install_basicsr_compat
        install_basicsr_compat()
        from basicsr.archs.srvgg_arch import SRVGGNetCompact
        model = SRVGGNetCompact(3, 3, num_feat=settings['num_feat'], num_conv=settings['num_block'], upscale=4,
                                act_type='prelu')
        return model.eval(), f"SRVGG x4 num_feat={settings['num_feat']} num_conv={settings['num_block']}"
    from oaq_plugin.archs import IMDN as IMDNArch
    model = IMDNArch(num_feat=settings['num_feat'], num_block=settings['num_block'], upscale=4)
    return model.eval(), f"IMDN x4 num_feat={settings['num_feat']} num_block={settings['num_block']}"


def lattice_config(options: dict) -> dict:
    """``options`` with the method's integer-lattice option on, where this checkout's config has it."""
    import dataclasses

    from oaq_plugin import OAQConfig
    names = {f.name for f in dataclasses.fields(OAQConfig)}
    return {**options, 'integer_lattice': True} if 'integer_lattice' in names else dict(options)


def bench_network(settings: dict, sizes: Dict[str, tuple], variants: List[str], timer, device, precisions,
                  int8: bool) -> List[dict]:
    import torch
    from oaq_plugin import OAQConfig, quantize
    from oaq_plugin.backends.reference import ReferenceExecutor
    from oaq_plugin.backends.select import backend_summary, to_backend
    from oaq_plugin.quant import quant_layers

    model, case_name = end_to_end_model(settings)
    model = model.to(device)
    calibration = [torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(i)).to(device) for i in range(2)]
    quantized = {}
    for variant in variants:
        options = {'search': {'enabled': False}, 'reconstruction': {'enabled': False},
                   'distillation': {'enabled': False}, **E2E_VARIANTS[variant]}
        options = lattice_config(options) if int8 else options
        qmodel = quantize(model, calibration, OAQConfig.from_dict(options), progress=False)
        snapped = snap_to_lattice(qmodel) if int8 else None
        quantized[variant] = (qmodel, options, snapped)
    rows = []
    for size_label, (h, w) in sizes.items():
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
        common = {'case': f'{case_name} on {size_label}', 'input': [1, 3, h, w]}
        with torch.no_grad():
            for label, dtype, tf32 in (('cuDNN fp32', torch.float32, False), ('cuDNN tf32', torch.float32, True),
                                       ('cuDNN fp16', torch.float16, False)):
                if device == 'cpu' and (tf32 or dtype == torch.float16):
                    continue
                net = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last)
                xi = x.to(dtype).contiguous(memory_format=torch.channels_last)
                rows.append({**common, 'backend': label, 'bits': 'float',
                             **with_tf32(tf32, lambda: timer(lambda: net(xi)))})
            rows += tensorrt_rows(model, x, common, timer, device)
            for variant in variants:
                qmodel, options, snapped = quantized[variant]
                rows += tensorrt_rows(model, x, {**common, 'bits': variant}, timer, device, qmodel)
                to_backend(qmodel, 'reference')
                expected = qmodel(x)
                # Timed like the layer rows: the unfused PyTorch path with a true-fp32 conv per layer.
                for _, layer in quant_layers(qmodel):
                    layer.executor = ReferenceExecutor(torch.float32)
                stats = with_tf32(False, lambda: timer(lambda: qmodel(x)))
                rows.append({**common, 'backend': 'PyTorch unfused (decode + fp32 conv)', 'bits': variant, **stats})
                for precision in precisions:
                    to_backend(qmodel, 'triton', precision=precision)
                    error = relative_error(qmodel(x), expected)
                    summary = backend_summary(qmodel)
                    rows.append({**common, 'backend': 'triton', 'bits': variant, 'precision': precision,
                                 'triton_layers': sum(v == 'triton' for v in summary.values()),
                                 'quantized_layers': len(summary), 'relative_error': error,
                                 # Requantizing every layer input can flip a code where values sit on a rounding
                                 # boundary, so whole-network outputs are compared with a looser bound.
                                 'ok': error < NETWORK_TOLERANCE, **timer(lambda: qmodel(x))})
                if int8:
                    to_backend(qmodel, 'triton_int8', precision=precisions[-1])
                    error = relative_error(qmodel(x), expected)
                    summary = backend_summary(qmodel)
                    rows.append({**common, 'backend': 'triton int8', 'bits': variant,
                                 'precision': f'fallback layers: {precisions[-1]}',
                                 'int8_layers': sum(v == 'triton_int8' for v in summary.values()),
                                 'triton_layers': sum(v == 'triton' for v in summary.values()),
                                 'quantized_layers': len(summary), 'lattice_option': 'integer_lattice' in options,
                                 'grids': snapped, 'relative_error': error, 'ok': error < NETWORK_TOLERANCE,
                                 **timer(lambda: qmodel(x))})
    return rows


# --- the pipeline -------------------------------------------------------------------------------------------------

PIPELINE_MODELS = {'IMDN x4': NETWORKS['IMDN'], 'EDSR-M x4': NETWORKS['EDSR-M']}
CPU_PIPELINE_MODELS = {'IMDN x4': CPU_CHECK_NETWORKS['IMDN'], 'EDSR-M x4': CPU_CHECK_NETWORKS['EDSR-M']}
# Tiny settings of the CPU check: every stage the timing covers runs, briefly.
CPU_PIPELINE_OPTIONS = {
    'calib': {'num_batches': 1, 'batch_size': 2, 'patch_size': 12},
    'search': {'grid_size': 2, 'refine_rounds': 0, 'num_samples': 1, 'window': 4},
    'reconstruction': {'enabled': True, 'iterations': 2, 'num_samples': 2, 'patch_size': 8, 'batch_size': 1},
    'distillation': {'enabled': False},
}


def calibration_images(calib_dir: Optional[str], cpu: bool):
    """``(images, description)``: LR images of ``calib_dir`` (or SunHays80 x4 under OAQ_SHARED), else synthetic."""
    import torch
    folder = Path(calib_dir) if calib_dir else None
    if folder is None and not cpu:
        from oaq_plugin.paths import shared_path
        candidate = shared_path('data', 'calib', 'SunHays80', 'LR_bicubic', 'X4')
        folder = candidate if candidate.is_dir() else None
    if folder is not None:
        from oaq_plugin.pipeline.io.images import read_image
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in ('.png', '.jpg', '.jpeg', '.bmp'))
        if not files:
            raise FileNotFoundError(f'no images in {folder}')
        return [read_image(p) for p in files], f'{len(files)} LR images of {folder}'
    count, size = (3, 16) if cpu else (80, 120)
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(count, 3, size // 4, size // 4, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode='bicubic', align_corners=False).clamp(0, 1)
    return list(images), f'{count} synthetic smooth {size}x{size} images'


def bench_pipeline(models: Dict[str, dict], device, calib_dir: Optional[str], cpu: bool) -> List[dict]:
    """Seconds of calibrate + search + block reconstruction (the defaults, reconstruction on, distillation off) per
    model."""
    import torch
    from oaq_plugin import OAQConfig
    from oaq_plugin.pipeline.io.patches import PatchSource
    from oaq_plugin.pipeline.run import run_pipeline

    images, description = calibration_images(calib_dir, cpu)
    options = CPU_PIPELINE_OPTIONS if cpu else {'reconstruction': {'enabled': True}, 'distillation': {'enabled': False}}
    rows = []
    for label, settings in models.items():
        model, case_name = end_to_end_model(settings)
        model = model.to(device)
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run_pipeline(model, PatchSource(images), OAQConfig.from_dict(options), progress=False)
        if device == 'cuda':
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        timings = {key: round(value, 3) for key, value in result.timings.items()}
        stages = sum(timings.get(key, 0.0) for key in ('calibrate_s', 'search_s', 'reconstruction_s'))
        rows.append({'case': f'{label} ({case_name}, random weights)', 'calibration': description,
                     'options': options, 'timings': timings, 'calibrate_search_reconstruction_s': round(stages, 3),
                     'wall_s': round(wall, 3)})
    return rows


# --- output -------------------------------------------------------------------------------------------------------

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
        try:
            import tensorrt
            info['tensorrt'] = tensorrt.__version__
        except ImportError:
            info['tensorrt'] = None
    else:
        info['device'] = f'CPU ({platform.processor() or platform.machine()}), Triton interpreter'
    return info


def speed_table(rows: List[dict]) -> List[str]:
    lines = ['| case | backend | path | bits | dot precision | config (BM, BN, BK, warps, stages) | median ms | '
             'p10 | p90 | vs cuDNN fp32 | vs cuDNN fp16 | check |',
             '|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|']
    baselines = {key: {r['case']: r['median_ms'] for r in rows if r.get('backend') == key and 'median_ms' in r}
                 for key in ('cuDNN fp32', 'cuDNN fp16')}
    for r in rows:
        backend = r['backend'] + (f" ({r['selection']})" if r.get('selection') else '')
        head = (f"| {r['case']} | {backend} | {r.get('path', '')} | {r.get('bits', '')} | "
                f"{r.get('precision', '')} | {tuple(r['config']) if 'config' in r else ''} |")
        if 'median_ms' not in r:
            note = f"skipped: {r['skipped']}" if 'skipped' in r else f"failed: {r.get('error', '')}"
            lines.append(f'{head} {note} | | | | | |')
            continue
        ratios = []
        for key in ('cuDNN fp32', 'cuDNN fp16'):
            base = baselines[key].get(r['case'])
            ratios.append(f'{base / r["median_ms"]:.2f}x' if base else '')
        lines.append(f"{head} {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | {ratios[0]} | "
                     f"{ratios[1]} | {check_note(r)} |")
    return lines


def check_note(row: dict) -> str:
    notes = []
    if 'relative_error' in row:
        notes.append(f"rel. error {row['relative_error']:.1e}")
    if 'accumulators_exact' in row:
        notes.append('int32 exact' if row['accumulators_exact'] else 'int32 DIFFER')
    if row.get('input_code_mismatches'):
        notes.append(f"{row['input_code_mismatches']} input codes differ")
    if 'fused_code_agreement' in row and row['fused_code_agreement'] < 1:
        notes.append(f"fused codes agree {row['fused_code_agreement']:.6f}")
    if 'int8_layers' in row:
        notes.append(f"{row['int8_layers']} int8 + {row['triton_layers']} fp32-kernel layers of "
                     f"{row['quantized_layers']}")
    if 'tops' in row and row['tops']:
        notes.append(f"{row['tops']:.1f} TOPS")
    if 'gb_per_s' in row:
        notes.append(f"{row['gb_per_s']:.0f} GB/s")
    if row.get('ok') is False:
        notes.append('FAILED')
    return ', '.join(notes)


def pipeline_table(rows: List[dict]) -> List[str]:
    lines = ['| model | calibration data | calibrate s | search s | reconstruction s | sum s | wall s |',
             '|---|---|---:|---:|---:|---:|---:|']
    for r in rows:
        t = r['timings']
        if 'error' in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['calibration']} | {t.get('calibrate_s', 0):.1f} | {t.get('search_s', 0):.1f} "
                     f"| {t.get('reconstruction_s', 0):.1f} | {r['calibrate_search_reconstruction_s']:.1f} | "
                     f"{r['wall_s']:.1f} |")
    return lines


def write_results(out: Path, name: str, payload: dict, markdown: List[str], quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{name}.json').write_text(json.dumps(payload, indent=2) + '\n')
    (out / f'{name}.md').write_text('\n'.join(markdown) + '\n')
    if not quiet:
        print('\n'.join(markdown))
        print(f'\nwritten: {out / (name + ".json")}, {out / (name + ".md")}')


def run_speed(args: argparse.Namespace) -> int:
    import torch
    device = 'cpu' if args.check_on_cpu else 'cuda'
    int8 = not args.no_int8
    if device == 'cuda':
        torch.backends.cudnn.benchmark = True
        timer = CudaTimer(args.warmup, args.repeats)
        e2e_timer = CudaTimer(min(args.warmup, 5), args.e2e_repeats or args.repeats)
        shapes, networks, sweep = LAYER_SHAPES, {k: NETWORKS[k] for k in args.networks}, not args.no_sweep
        sizes, pipeline_models = {k: E2E_SIZES[k] for k in args.e2e_sizes}, PIPELINE_MODELS
    else:
        timer = e2e_timer = WallTimer(0, 1)
        shapes, networks, sweep = CPU_CHECK_SHAPES, {k: CPU_CHECK_NETWORKS[k] for k in args.networks}, False
        sizes, pipeline_models = CPU_CHECK_SIZES, CPU_PIPELINE_MODELS
    info = environment(device, args.command)
    payload = {'environment': info, 'tolerance': TOLERANCE, 'int8_tolerance': INT8_TOLERANCE,
               'network_tolerance': NETWORK_TOLERANCE, 'layers': [], 'end_to_end': [], 'pipeline': []}

    def markdown() -> List[str]:
        lines = [f"Kernel speed on {info['device']} ({info['date']}; torch {info['torch']}, triton {info['triton']})",
                 f"Command: `python tools/{info['command']}`; medians of {timer.repeats} runs after {timer.warmup} "
                 f'warm-up runs per layer, {e2e_timer.repeats} after {e2e_timer.warmup} per network (CUDA events, '
                 'L2 flushed before each run)' if device == 'cuda' else
                 'CPU check in the Triton interpreter: timings are NOT speed measurements', '']
        for key in ('layers', 'end_to_end'):
            if payload[key]:
                lines += speed_table(payload[key]) + ['']
        if payload['pipeline']:
            lines += pipeline_table(payload['pipeline']) + ['']
        failed = [r for r in payload['layers'] + payload['end_to_end'] if r.get('ok') is False]
        if failed:
            lines.append(f'{len(failed)} Triton run(s) disagreed with the reference beyond the tolerance.')
        return lines

    def save(final: bool = False) -> None:
        # Written after every part, so a run stopped by a time limit keeps what it measured.
        write_results(Path(args.out), args.name, payload, markdown(), quiet=not final)

    if not args.no_layers:
        for name, shape in shapes.items():
            payload['layers'] += bench_layers({name: shape}, timer, device, args.precisions, sweep, int8)
            save()
    if not args.no_e2e:
        for label, settings in networks.items():
            try:
                payload['end_to_end'] += bench_network(settings, sizes, args.e2e_bits, e2e_timer, device,
                                                       args.precisions, int8)
            except ImportError as missing:  # EDSR and SRVGG need basicsr; IMDN is this package's own arch
                payload['end_to_end'].append({'case': f'{label} x4', 'backend': 'all', 'error': str(missing)})
            save()
    if args.pipeline:
        for label, settings in pipeline_models.items():
            try:
                payload['pipeline'] += bench_pipeline({label: settings}, device, args.calib_dir, device == 'cpu')
            except ImportError as missing:  # EDSR needs basicsr
                payload['pipeline'].append({'case': label, 'error': str(missing), 'timings': {}, 'calibration': '',
                                            'calibrate_search_reconstruction_s': 0.0, 'wall_s': 0.0})
            save()
    save(final=True)
    failed = [r for r in payload['layers'] + payload['end_to_end'] if r.get('ok') is False]
    return 1 if failed else 0


def run_sizes(args: argparse.Namespace) -> int:
    import torch
    from oaq_plugin import OAQConfig
    from oaq_plugin.compat import install_basicsr_compat
    from oaq_plugin.paths import shared_path
    from oaq_plugin.pipeline.io.export import float_size_bytes, quantized_size_bytes, save_quantized
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
        config = OAQConfig.from_dict({'search': {'enabled': False}, 'reconstruction': {'enabled': False},
                                      'distillation': {'enabled': False}, **options})
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
              'Use --sizes for checkpoint sizes, or --cpu-check to run every check of the script in the '
              'Triton interpreter.', file=sys.stderr)
        return 2
    return run_speed(args)


if __name__ == '__main__':
    sys.exit(main())
