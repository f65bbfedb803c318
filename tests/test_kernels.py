"""The Triton quantized conv/linear kernel against the integer reference (interpreter on CPU, tiny shapes)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip('triton')

from layer_cases import GRIDS, make_layer, random_input, relative_error, single_thread  # noqa: E402,F401
from oaq_plugin.backends.reference import reference_forward  # noqa: E402
from oaq_plugin.backends.triton_backend import TritonExecutor, grid_params  # noqa: E402
from oaq_plugin.kernels.quant_conv2d import pack_weight, quant_conv2d  # noqa: E402
from oaq_plugin.quant import UniformQuantizer  # noqa: E402
from tiny_sr import load_tool  # noqa: E402

TOLERANCE = 1e-5


def check(layer, x):
    expected = reference_forward(layer, x, torch.float64)
    actual = TritonExecutor()(layer, x)
    assert actual.shape == expected.shape
    assert actual.dtype == x.dtype
    error = relative_error(actual, expected)
    assert error < TOLERANCE, f'relative error {error:.3g}'
    return actual


# (in, out, kernel, stride, padding, dilation, groups, input size, w_bits, a_bits, grid)
CONV_CASES = {
    '1x1-W8A8-paper': (16, 16, 1, 1, 0, 1, 1, (5, 6), 8, 8, 'paper'),
    '3x3-s1-W4A4-paper': (8, 8, 3, 1, 1, 1, 1, (6, 7), 4, 4, 'paper'),
    '3x3-s2-W4A8-pwlq': (8, 12, 3, 2, 1, 1, 1, (7, 8), 4, 8, 'pwlq'),
    '3x3-W8A4-uniform': (6, 10, 3, 1, 1, 1, 1, (5, 5), 8, 4, 'uniform'),
    '5x5-W4A4-one-sided': (4, 6, 5, 1, 2, 1, 1, (6, 5), 4, 4, 'one_sided_high'),
    '9x9-W4A4-paper': (2, 3, 9, 1, 4, 1, 1, (4, 5), 4, 4, 'paper'),
    'grouped4-3x3-W4A4': (16, 16, 3, 1, 1, 1, 4, (5, 6), 4, 4, 'one_sided_low'),
    'depthwise-3x3-W8A8': (6, 6, 3, 1, 1, 1, 6, (5, 5), 8, 8, 'pwlq'),
    'dilated-3x3-W4A4': (5, 7, 3, 1, 2, 2, 1, (7, 6), 4, 4, 'degenerate'),
    'stride-pad-uneven': (5, 4, 3, (2, 1), (0, 1), 1, 1, (7, 6), 3, 5, 'paper'),
}


@pytest.mark.parametrize('case', list(CONV_CASES), ids=list(CONV_CASES))
def test_conv_matches_reference(case):
    cin, cout, k, stride, padding, dilation, groups, size, w_bits, a_bits, grid = CONV_CASES[case]
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    layer = make_layer(conv, w_bits, a_bits, grid, seed=list(CONV_CASES).index(case))
    check(layer, random_input((2, cin) + size))


@pytest.mark.parametrize('w_bits,a_bits,granularity', [(8, 8, 'tensor'), (4, 4, 'channel'), (4, 8, 'channel'),
                                                       (6, 3, 'channel')])
def test_linear_matches_reference(w_bits, a_bits, granularity):
    layer = make_layer(nn.Linear(20, 18), w_bits, a_bits, 'paper', granularity=granularity)
    check(layer, random_input((3, 4, 20)))


@pytest.mark.parametrize('w_bits', [2, 3, 5, 7])
def test_other_weight_widths(w_bits):
    layer = make_layer(nn.Conv2d(6, 5, 3, padding=1), w_bits, 4, 'paper', weight_grid='zero', seed=w_bits)
    check(layer, random_input((1, 6, 4, 5)))


def test_channels_last_input_and_output():
    layer = make_layer(nn.Conv2d(8, 16, 3, padding=1), 4, 4, 'paper')
    x = random_input((2, 8, 5, 6)).contiguous(memory_format=torch.channels_last)
    out = check(layer, x)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('padding,padding_mode', [('same', 'zeros'), (1, 'reflect'), (1, 'replicate')])
def test_padding_variants(padding, padding_mode):
    layer = make_layer(nn.Conv2d(4, 6, (3, 4) if padding == 'same' else 3, padding=padding,
                                 padding_mode=padding_mode), 4, 4, 'paper')
    check(layer, random_input((1, 4, 5, 6)))


def test_rounding_ties_match_torch():
    """Values exactly halfway between levels round to even, as torch.round does."""
    quantizer = UniformQuantizer(4)
    quantizer.set_bounds(0.0, 7.5)  # step 0.5: multiples of 0.25 are ties
    layer = make_layer(nn.Conv2d(16, 16, 1), 8, 4, 'paper')
    layer.act_quantizer = quantizer
    x = (torch.arange(2 * 16 * 4 * 4, dtype=torch.float32) % 34 - 1).reshape(2, 16, 4, 4) * 0.25
    check(layer, x)


def test_bias_free_conv():
    layer = make_layer(nn.Conv2d(8, 8, 3, padding=1, bias=False), 4, 4, 'paper')
    check(layer, random_input((1, 8, 4, 4)))


@settings(max_examples=8, deadline=None)
@given(w_bits=st.integers(2, 8), a_bits=st.integers(2, 8), grid=st.sampled_from(GRIDS), seed=st.integers(0, 10_000),
       scale=st.floats(0.05, 300.0))
def test_random_quantizers_match_reference(w_bits, a_bits, grid, seed, scale):
    layer = make_layer(nn.Conv2d(4, 5, 3, padding=1), w_bits, a_bits, grid, seed=seed, scale=scale)
    check(layer, random_input((1, 4, 4, 5), seed=seed, scale=scale))


def test_pack_weight_layout_round_trip():
    codes = torch.randint(0, 16, (8, 3, 3, 3), dtype=torch.uint8)
    packed = pack_weight(codes, torch.ones(8), 7.5, None, groups=2, bits=4)
    matrix = torch.stack([packed.codes & 15, packed.codes >> 4], dim=2).reshape(2, -1, 4)[:, :27]
    expected = codes.reshape(2, 4, 3, 3, 3).permute(0, 3, 4, 2, 1).reshape(2, 27, 4)
    assert torch.equal(matrix, expected)
    assert packed.codes.shape == (2, 14, 4)


def test_wrapper_rejects_bad_input():
    layer = make_layer(nn.Conv2d(4, 4, 3, padding=1), 8, 8, 'paper')
    codes, step, zero_point = layer.weight_quantizer.integer_codes(layer.weight)
    weight = pack_weight(codes, step, zero_point, layer.module.bias, groups=1, bits=8)
    grid = grid_params(layer.act_quantizer.grid(), torch.device('cpu'))
    with pytest.raises(ValueError, match='float32'):
        quant_conv2d(torch.zeros(1, 4, 4, 4, dtype=torch.float64), weight, grid, padding=1)
    with pytest.raises(ValueError, match='channels'):
        quant_conv2d(torch.zeros(1, 3, 4, 4), weight, grid, padding=1)
    with pytest.raises(ValueError, match='too small'):
        quant_conv2d(torch.zeros(1, 4, 1, 1), weight, grid)


@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for machines without CUDA')
def test_bench_refuses_without_cuda(capsys):
    assert load_tool('bench_kernels').main(['--out', 'unused']) == 2
    assert 'no CUDA device' in capsys.readouterr().err


def test_bench_check_mode_runs_every_layer_path(tmp_path):
    import json
    bench = load_tool('bench_kernels')
    assert bench.main(['--check-on-cpu', '--no-e2e', '--precisions', 'ieee', '--out', str(tmp_path)]) == 0
    result = json.loads((tmp_path / 'bench_kernels.json').read_text())
    triton_rows = [r for r in result['layers'] if r['backend'] == 'triton']
    assert len(triton_rows) == len(bench.CPU_CHECK_SHAPES) * len(bench.BITS)
    assert all(r['ok'] and r['relative_error'] < TOLERANCE for r in triton_rows)
    assert 'Triton interpreter' in (tmp_path / 'bench_kernels.md').read_text()
