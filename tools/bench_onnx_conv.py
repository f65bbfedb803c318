#!/usr/bin/env python
"""One 3x3 convolution in each form ONNX Runtime (CPU) can run it: float, and the integer forms by operand
signedness. Shows which integer product is fast on this CPU, and by how much, apart from the rounding ops
of a whole quantized network (``tools/bench_onnx.py``).

Forms: ``Conv`` fp32; ``ConvInteger`` (int32 output) with int8 or uint8 activations times int8 or uint8
weights (the export uses uint8 x uint8, the one form exact on every CPU); ``QLinearConv`` (requantized
uint8/int8 output, per-channel weight scales, bias fused) with the same operand types. Random codes; the
timing does not depend on the values. The rows run in turn in one process (one run of each per round),
median of ``--runs`` rounds after ``--warmup``.

    python tools/bench_onnx_conv.py --out docs/bench --name onnx_conv_forms_cpu
    python tools/bench_onnx_conv.py --channels 64 --height 180 --width 320 --threads 1 2

Writes ``<name>.json`` and ``<name>.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import cpu_description, time_in_turn  # noqa: E402

# (name, op, activation type, weight type)
FORMS: Tuple[Tuple[str, str, str, str], ...] = (
    ('Conv fp32', 'Conv', 'f32', 'f32'),
    ('ConvInteger s8 x u8 (saturates without VNNI)', 'ConvInteger', 's8', 'u8'),
    ('ConvInteger u8 x s8', 'ConvInteger', 'u8', 's8'),
    ('ConvInteger u8 x u8 (the export)', 'ConvInteger', 'u8', 'u8'),
    ('QLinearConv u8 x s8', 'QLinearConv', 'u8', 's8'),
    ('QLinearConv u8 x u8', 'QLinearConv', 'u8', 'u8'),
    ('QLinearConv s8 x s8', 'QLinearConv', 's8', 's8'),
)
_NUMPY = {'f32': np.float32, 's8': np.int8, 'u8': np.uint8}


def conv_model(op: str, act: str, weight: str, channels: int) -> bytes:
    """A one-node ONNX model (opset 17, IR 8) of a padded 3x3 convolution ``channels`` -> ``channels``."""
    from onnx import TensorProto, helper, numpy_helper
    elem = {'f32': TensorProto.FLOAT, 's8': TensorProto.INT8, 'u8': TensorProto.UINT8}
    rng = np.random.default_rng(0)
    shape = (channels, channels, 3, 3)
    w_type, x_type = _NUMPY[weight], _NUMPY[act]
    if op == 'Conv':
        inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), 'w')]
        node = helper.make_node('Conv', ['x', 'w'], ['y'], pads=[1, 1, 1, 1])
        out_type = TensorProto.FLOAT
    else:
        low = -60 if weight == 's8' else 0
        inits = [numpy_helper.from_array(rng.integers(low, low + 120, shape).astype(w_type), 'w'),
                 numpy_helper.from_array(np.array(3, x_type), 'xz')]
        if op == 'ConvInteger':
            inits.append(numpy_helper.from_array(np.array(0 if weight == 's8' else 128, w_type), 'wz'))
            node = helper.make_node('ConvInteger', ['x', 'w', 'xz', 'wz'], ['y'], pads=[1, 1, 1, 1])
            out_type = TensorProto.INT32
        else:
            inits += [numpy_helper.from_array(np.full(channels, 1e-3, np.float32), 'ws'),
                      numpy_helper.from_array(np.full(channels, 0 if weight == 's8' else 128, w_type), 'wz'),
                      numpy_helper.from_array(np.array(0.05, np.float32), 'xs'),
                      numpy_helper.from_array(np.array(0.5, np.float32), 'ys'),
                      numpy_helper.from_array(np.array(3, x_type), 'yz'),
                      numpy_helper.from_array(np.zeros(channels, np.int32), 'b')]
            node = helper.make_node('QLinearConv', ['x', 'xs', 'xz', 'w', 'ws', 'wz', 'ys', 'yz', 'b'], ['y'],
                                    pads=[1, 1, 1, 1])
            out_type = elem[act]
    inputs = [helper.make_tensor_value_info('x', elem[act], [1, channels, None, None])]
    graph = helper.make_graph([node], 'conv', inputs, [helper.make_tensor_value_info('y', out_type, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    return model.SerializeToString()


def example(act: str, channels: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    if act == 'f32':
        return rng.standard_normal((1, channels, height, width)).astype(np.float32)
    low = -60 if act == 's8' else 0
    return rng.integers(low, low + 120, (1, channels, height, width)).astype(_NUMPY[act])


def measure(channels: int, height: int, width: int, threads: int, warmup: int, runs: int) -> Dict[str, float]:
    """Median milliseconds per form, the forms run in turn in one process."""
    from oaq_plugin.pipeline.io.onnx_export import onnx_session
    calls: List[Callable[[], object]] = []
    for _, op, act, weight in FORMS:
        session = onnx_session(conv_model(op, act, weight, channels), threads)
        feed = {'x': example(act, channels, height, width)}
        calls.append(lambda session=session, feed=feed: session.run(None, feed))
    times = time_in_turn(calls, warmup, runs)
    return {name: 1000.0 * statistics.median(seconds) for (name, *_), seconds in zip(FORMS, times)}


def markdown(result: dict) -> str:
    threads = result['threads']
    lines = ['| form | ' + ' | '.join(f'{t} thread{"s" if t > 1 else ""} (ms)' for t in threads)
             + ' | vs Conv fp32 (1st column) |', '|---|' + '---:|' * (len(threads) + 1)]
    base = result['ms'][str(threads[0])]['Conv fp32']
    for name, *_ in FORMS:
        cells = ' | '.join(f"{result['ms'][str(t)][name]:.1f}" for t in threads)
        lines.append(f'| {name} | {cells} | {base / result["ms"][str(threads[0])][name]:.2f}x |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--height', type=int, default=180)
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--threads', nargs='+', type=int, default=[1])
    parser.add_argument('--runs', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--out', default='docs/bench')
    parser.add_argument('--name', default='onnx_conv_forms_cpu')
    args = parser.parse_args(argv)
    import onnxruntime
    result = {'date': datetime.datetime.now().isoformat(timespec='seconds'), 'cpu': cpu_description(),
              'onnxruntime': onnxruntime.__version__, 'channels': args.channels,
              'frame': [args.height, args.width], 'threads': args.threads, 'runs': args.runs,
              'warmup': args.warmup, 'ms': {}}
    for threads in args.threads:
        result['ms'][str(threads)] = measure(args.channels, args.height, args.width, threads, args.warmup, args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{args.name}.json').write_text(json.dumps(result, indent=1) + '\n')
    (out / f'{args.name}.md').write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
