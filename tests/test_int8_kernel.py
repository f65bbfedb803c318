"""The int8 lattice conv/linear kernel and the triton_int8 backend (Triton interpreter on CPU, tiny shapes)."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip('triton')

from layer_cases import make_layer, random_input, relative_error, single_thread  # noqa: E402,F401
from oaq_plugin.backends.int8_backend import Int8Executor, integer_lattice, lattice_params  # noqa: E402
from oaq_plugin.backends.reference import decode_weight, reference_forward  # noqa: E402
from oaq_plugin.backends.select import backend_summary, to_backend  # noqa: E402
from oaq_plugin.kernels.int8_conv2d import (LatticeGrid, int8_conv2d, int8_conv2d_reference, int8_linear,  # noqa: E402
                                            int8_linear_reference, lattice_quantize, lattice_quantize_reference,
                                            pack_int8_weight)
from oaq_plugin.quant import DualRegionQuantizer, UniformQuantizer, WeightQuantizer  # noqa: E402
from oaq_plugin.quant.region_grid import Region, RegionGrid  # noqa: E402

LAYER_TOLERANCE = 1e-6


def dual_region_lattice(unit: float = 0.05, low_step: int = 9, high_step: int = 13, bits: int = 4):
    """A paper-level dual-region quantizer whose levels are ``unit * n``: odd n in the dense region, tails
    stepping ``low_step`` / ``high_step`` units."""
    dense = 2 ** (bits - 1) - 1
    tail = max(1, 2 ** (bits - 2)) - 1
    quantizer = DualRegionQuantizer(bits)
    quantizer.set_bounds(-(dense + tail * low_step) * unit, (dense + tail * high_step) * unit)
    quantizer.set_breakpoint(dense * unit)
    return quantizer


def one_sided_lattice(unit: float = 0.04, tail_step: int = 30):
    """A one-sided 4-bit dual-region quantizer on ``[0, ...]`` (a post-ReLU input): 0..11 then a tail."""
    quantizer = DualRegionQuantizer(4)
    quantizer.set_bounds(0.0, (11 + 3 * tail_step) * unit)
    quantizer.set_breakpoint(11 * unit)
    return quantizer


def unsigned_uniform_lattice(unit: float = 0.03, bits: int = 8):
    """A uniform grid 0..2^b-1 units: beyond int8 for 8 bits, so it is stored shifted (zero = 128)."""
    quantizer = UniformQuantizer(bits)
    quantizer.set_bounds(0.0, (2 ** bits - 1) * unit)
    return quantizer


def kernel_lattice(quantizer) -> LatticeGrid:
    grid = quantizer.grid()
    lattice, why = integer_lattice(grid)
    assert lattice is not None, why
    return lattice_params(grid, lattice, torch.device('cpu'))


def random_weight(out_channels, c_group, kernel, groups, bits, grid='paper', seed=0):
    generator = torch.Generator().manual_seed(seed)
    quantizer = WeightQuantizer(bits, grid=grid)
    levels = quantizer.num_levels
    codes = torch.randint(0, levels, (out_channels, c_group) + kernel, generator=generator)
    step = torch.rand(out_channels, generator=generator) * 0.02 + 0.005
    bias = torch.randn(out_channels, generator=generator)
    return codes, step, quantizer.zero_point, bias


def random_codes(shape, grid: LatticeGrid, seed=0):
    """int8 codes of random levels of ``grid`` (extremes included)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, grid.integers.numel(), shape, generator=generator)
    return (grid.integers[index] - grid.zero).to(torch.int8)


# (out, in, kernel, stride, padding, dilation, groups, input HxW, weight bits, weight grid, input lattice)
ACCUMULATOR_CASES = {
    '3x3-W4-packed-dual': (16, 16, (3, 3), 1, 1, 1, 1, (5, 6), 4, 'paper', 'dual'),
    '3x3-W8-odd-split-shifted-input': (12, 8, (3, 3), 1, 1, 1, 1, (4, 5), 8, 'paper', 'uniform8'),
    '3x3-W5-zero-grid': (8, 8, (3, 3), 1, 1, 1, 1, (4, 4), 5, 'zero', 'one_sided'),
    'stride2-uneven-padding-shifted': (6, 5, (3, 3), (2, 1), (0, 1, 2, 1), 1, 1, (7, 6), 4, 'paper', 'uniform8'),
    'dilated-packed-odd-K': (7, 5, (3, 3), 1, 2, 2, 1, (6, 6), 3, 'paper', 'dual'),
    'grouped4': (16, 16, (3, 3), 1, 1, 1, 4, (4, 5), 4, 'paper', 'one_sided'),
    'depthwise-shifted': (6, 6, (3, 3), 1, 1, 1, 6, (4, 4), 8, 'paper', 'uniform8'),
    '5x3-no-padding': (5, 4, (5, 3), 1, 0, 1, 1, (6, 5), 6, 'paper', 'dual'),
}
LATTICES = {'dual': dual_region_lattice, 'one_sided': one_sided_lattice, 'uniform8': unsigned_uniform_lattice}


@pytest.mark.parametrize('case', list(ACCUMULATOR_CASES), ids=list(ACCUMULATOR_CASES))
def test_accumulators_equal_integer_products(case):
    oc, cin, kernel, stride, padding, dilation, groups, size, bits, weight_grid, lattice = ACCUMULATOR_CASES[case]
    seed = list(ACCUMULATOR_CASES).index(case)
    codes, step, zero_point, bias = random_weight(oc, cin // groups, kernel, groups, bits, weight_grid, seed)
    weight = pack_int8_weight(codes, step, zero_point, bias, groups, bits)
    grid = kernel_lattice(LATTICES[lattice]())
    x = random_codes((2,) + size + (cin,), grid, seed)
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    actual = int8_conv2d(x, weight, grid, output='accumulators', **geometry)
    expected = int8_conv2d_reference(x, weight, grid, output='accumulators', **geometry)
    assert actual.dtype == torch.int32
    assert torch.equal(actual, expected)
    # The integer sums are the products of the decoded values, divided by the two units.
    top, bottom, left, right = (padding,) * 4 if isinstance(padding, int) else padding
    values = nn.functional.pad((x.double() + grid.zero).permute(0, 3, 1, 2) * grid.unit, (left, right, top, bottom))
    decoded = (codes.double() - zero_point) * step.double()[:, None, None, None]
    products = nn.functional.conv2d(values, decoded, None, stride, 0, dilation, groups).permute(0, 2, 3, 1)
    units = grid.unit * weight.step.double()
    assert torch.allclose(actual.double() * units, products, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('activation,slope', [('identity', 0.0), ('relu', 0.0), ('leaky_relu', 0.1),
                                              ('prelu', 'per-channel'), ('prelu', 0.25)])
def test_epilogue_activation_matches_reference(activation, slope):
    codes, step, zero_point, bias = random_weight(12, 8, (3, 3), 1, 4, seed=3)
    weight = pack_int8_weight(codes, step, zero_point, bias, 1, 4)
    grid = kernel_lattice(dual_region_lattice())
    x = random_codes((1, 4, 5, 8), grid, seed=3)
    if slope == 'per-channel':
        slope = torch.linspace(-0.5, 0.5, 12)
    actual = int8_conv2d(x, weight, grid, padding=1, activation=activation, slope=slope)
    expected = int8_conv2d_reference(x, weight, grid, padding=1, activation=activation, slope=slope)
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected)
    if activation != 'identity':
        plain = int8_conv2d_reference(x, weight, grid, padding=1)
        assert (plain < 0).any() and not torch.equal(actual, plain)


@pytest.mark.parametrize('next_quantizer', ['dual', 'one_sided', 'uniform8'])
def test_fused_next_layer_quantization(next_quantizer):
    """Codes out of the epilogue are the next layer's own codes of this layer's activated output."""
    codes, step, zero_point, bias = random_weight(16, 8, (3, 3), 1, 4, seed=4)
    weight = pack_int8_weight(codes, step * 20, zero_point, bias, 1, 4)
    grid = kernel_lattice(dual_region_lattice())
    next_q = LATTICES[next_quantizer]()
    next_grid = kernel_lattice(next_q)
    x = random_codes((2, 4, 5, 8), grid, seed=4)
    actual = int8_conv2d(x, weight, grid, padding=1, activation='leaky_relu', slope=0.2, next_grid=next_grid,
                         output='codes')
    expected = int8_conv2d_reference(x, weight, grid, padding=1, activation='leaky_relu', slope=0.2,
                                     next_grid=next_grid, output='codes')
    assert actual.dtype == torch.int8
    assert torch.equal(actual, expected)
    # The same codes as the next layer's quantizer gives the float output (its region grid, its codes).
    y = int8_conv2d_reference(x, weight, grid, padding=1, activation='leaky_relu', slope=0.2)
    region_codes = next_q.grid().encode(y)
    assert torch.equal(actual.long() + next_grid.zero, next_grid.integers.long()[region_codes])
    assert len(torch.unique(actual)) > 4


@pytest.mark.parametrize('layout', ['nchw', 'channels_last', 'rows'])
def test_lattice_quantize_matches_region_grid_codes(layout):
    quantizer = dual_region_lattice()
    grid = kernel_lattice(quantizer)
    if layout == 'rows':
        x = random_input((3, 5, 20), scale=0.6)
    else:
        x = random_input((2, 8, 4, 5), scale=0.6)
        # Exact ties between levels and values on every level and threshold.
        x.view(-1)[:64] = torch.arange(-32, 32, dtype=torch.float32) * grid.unit
        if layout == 'channels_last':
            x = x.contiguous(memory_format=torch.channels_last)
    actual = lattice_quantize(x, grid)
    expected = grid.integers.long()[quantizer.grid().encode(x)] - grid.zero
    if x.dim() == 4:
        expected = expected.permute(0, 2, 3, 1)
    assert torch.equal(actual.long(), expected)
    assert torch.equal(lattice_quantize_reference(x, grid).long(), grid.integers.long()[quantizer.grid().encode(x)]
                       - grid.zero)


def test_linear_on_the_same_kernel():
    codes, step, zero_point, bias = random_weight(18, 20, (), 1, 8, seed=5)
    weight = pack_int8_weight(codes, step, zero_point, bias, 1, 8)
    grid = kernel_lattice(unsigned_uniform_lattice())
    x = random_codes((3, 4, 20), grid, seed=5)
    accumulators = int8_linear(x, weight, grid, output='accumulators')
    assert accumulators.shape == (3, 4, 18)
    assert torch.equal(accumulators, int8_linear_reference(x, weight, grid, output='accumulators'))
    assert torch.equal(int8_linear(x, weight, grid, activation='relu'),
                       int8_linear_reference(x, weight, grid, activation='relu'))


@pytest.mark.parametrize('bits,grid', [(b, g) for b in range(2, 9) for g in ('paper', 'zero')])
def test_packed_weight_integers_decode_to_the_weight(bits, grid):
    codes, step, zero_point, _ = random_weight(6, 4, (3, 3), 2, bits, grid, seed=bits)
    weight = pack_int8_weight(codes, step, zero_point, None, 2, bits)
    assert weight.packed4 == (bits <= 4)
    decoded = (codes.double() - zero_point) * step.double()[:, None, None, None]
    rebuilt = weight.integers().double() * weight.step.double()[:, None, None, None]
    assert torch.allclose(rebuilt, decoded, rtol=1e-6, atol=0)
    assert torch.equal(weight.colsum, weight.integers().reshape(6, -1).sum(1).int())


def test_wrapper_rejects_bad_input():
    codes, step, zero_point, bias = random_weight(4, 4, (3, 3), 1, 4)
    weight = pack_int8_weight(codes, step, zero_point, bias, 1, 4)
    grid = kernel_lattice(dual_region_lattice())
    x = torch.zeros(1, 4, 4, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match='int8'):
        int8_conv2d(x.float(), weight, grid, padding=1)
    with pytest.raises(ValueError, match='contiguous'):
        int8_conv2d(x.permute(0, 2, 1, 3), weight, grid, padding=1)
    with pytest.raises(ValueError, match='channels'):
        int8_conv2d(torch.zeros(1, 4, 4, 3, dtype=torch.int8), weight, grid, padding=1)
    with pytest.raises(ValueError, match='too small'):
        int8_conv2d(torch.zeros(1, 1, 1, 4, dtype=torch.int8), weight, grid)
    with pytest.raises(ValueError, match='next_grid'):
        int8_conv2d(x, weight, grid, padding=1, output='codes')
    with pytest.raises(ValueError, match='activation'):
        int8_conv2d(x, weight, grid, padding=1, activation='gelu')
    with pytest.raises(ValueError, match='at least'):
        int8_conv2d(x, weight, grid, padding=1, blocks=(16, 16, 16))
    with pytest.raises(ValueError, match='leave the 4-bit'):
        pack_int8_weight(codes, step, 3.0, bias, 1, 4)
    with pytest.raises(ValueError, match='half-integer'):
        pack_int8_weight(codes, step, 7.25, bias, 1, 4)
    with pytest.raises(ValueError, match='leave int8'):
        LatticeGrid(unit=1.0, zero=0, integers=torch.arange(0, 200, dtype=torch.int32), middle=(0., 1., 0., 199., 0.))
    big = pack_int8_weight(torch.full((1, 70000, 1, 1), 255), torch.ones(1), 127.5, None, 1, 8)
    with pytest.raises(ValueError, match='overflow'):
        int8_conv2d(torch.zeros(1, 1, 1, 70000, dtype=torch.int8), big, grid)


# --- lattice detection -------------------------------------------------------------------------------------------

def test_lattice_detection_finds_the_unit_and_rejects_other_grids():
    lattice, _ = integer_lattice(dual_region_lattice(0.05).grid())
    assert lattice.zero == 0 and lattice.unit == pytest.approx(0.05, rel=1e-6)
    assert lattice.integers.tolist() == [-34, -25, -16, -7, -7, -5, -3, -1, 1, 3, 5, 7, 7, 20, 33, 46]
    lattice, _ = integer_lattice(unsigned_uniform_lattice().grid())
    assert lattice.zero == 128 and lattice.integers.tolist() == list(range(256))
    calibrated = make_layer(nn.Conv2d(4, 4, 3), 4, 4, 'paper').act_quantizer.grid()
    lattice, why = integer_lattice(calibrated)
    assert lattice is None and 'not integer multiples' in why
    # 8-bit dual-region levels need more than 256 integers.
    lattice, why = integer_lattice(dual_region_lattice(bits=8).grid())
    assert lattice is None


@settings(max_examples=25, deadline=None)
@given(unit=st.floats(1e-3, 50.0), offsets=st.lists(st.integers(-60, 60), min_size=3, max_size=3),
       steps=st.lists(st.integers(1, 9), min_size=3, max_size=3), counts=st.lists(st.integers(1, 8), min_size=3,
                                                                                  max_size=3))
def test_lattice_detection_property(unit, offsets, steps, counts):
    """Any grid built from integer offsets and steps is found, with levels reproduced within float rounding."""
    regions = [Region(offset=torch.tensor(o * unit), step=torch.tensor(s * unit), index_min=0, index_max=c - 1)
               for o, s, c in zip(offsets, steps, counts)]
    grid = RegionGrid(middle=regions[1], low=regions[0], high=regions[2], low_threshold=torch.tensor(0.0),
                      high_threshold=torch.tensor(1.0))
    lattice, why = integer_lattice(grid)
    assert lattice is not None, why
    levels = grid.level_table().double()
    assert (levels - lattice.integers.double() * lattice.unit).abs().max() <= 1e-6 * levels.abs().max()
    stored = lattice.integers - lattice.zero
    assert int(stored.min()) >= -128 and int(stored.max()) <= 127


# --- the backend -------------------------------------------------------------------------------------------------

# (module, input shape, weight bits, weight grid, lattice)
LAYER_CASES = {
    'conv3x3-W4A4-dual': (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 5, 6), 4, 'paper', 'dual'),
    'conv-W8-uniform8-shifted': (lambda: nn.Conv2d(6, 8, 3, padding=1), (1, 6, 4, 5), 8, 'paper', 'uniform8'),
    'conv-stride2-grouped': (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), (2, 8, 6, 6), 4, 'paper',
                             'one_sided'),
    'depthwise-dilated': (lambda: nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6), (1, 6, 5, 5), 6, 'zero',
                          'dual'),
    'conv-reflect': (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode='reflect'), (1, 4, 5, 5), 4, 'paper',
                     'uniform8'),
    'conv-same-uneven': (lambda: nn.Conv2d(4, 6, (3, 4), padding='same'), (1, 4, 5, 6), 4, 'paper', 'dual'),
    'linear': (lambda: nn.Linear(20, 18), (3, 4, 20), 8, 'paper', 'dual'),
}


def lattice_layer(case: str):
    build, shape, bits, weight_grid, lattice = LAYER_CASES[case]
    layer = make_layer(build(), bits, 4, 'paper', weight_grid=weight_grid, seed=list(LAYER_CASES).index(case))
    layer.act_quantizer = LATTICES[lattice]()
    return layer, shape


@pytest.mark.filterwarnings('ignore:Using padding=.same. with even kernel')
@pytest.mark.parametrize('case', list(LAYER_CASES), ids=list(LAYER_CASES))
def test_layer_output_equals_reference_backend(case):
    layer, shape = lattice_layer(case)
    x = random_input(shape, scale=0.8)
    actual = Int8Executor()(layer, x)
    expected = reference_forward(layer, x, torch.float64)
    assert actual.shape == expected.shape and actual.dtype == x.dtype
    assert relative_error(actual, expected) < LAYER_TOLERANCE


def test_executor_follows_parameter_changes():
    layer, shape = lattice_layer('conv3x3-W4A4-dual')
    layer.executor = Int8Executor()
    x = random_input(shape, scale=0.8)
    with torch.no_grad():
        before = layer(x)
        layer.weight_quantizer.set_clip(layer.weight_quantizer.clip * 0.7)
        after = layer(x)
    assert not torch.equal(before, after)
    assert relative_error(after, reference_forward(layer, x, torch.float64)) < LAYER_TOLERANCE


def test_backend_runs_lattice_layers_int8_and_falls_back_for_the_others(caplog):
    first, _ = lattice_layer('conv3x3-W4A4-dual')
    second = make_layer(nn.Conv2d(12, 6, 3, padding=1), 4, 4, 'paper', seed=7, name='not_lattice')
    tail = make_layer(nn.ConvTranspose2d(6, 3, 3, padding=1), 4, 4, 'paper', seed=8, name='transposed')
    tail.act_quantizer = unsigned_uniform_lattice(0.01)
    first.layer_name = 'lattice'
    model = nn.Sequential(first, nn.ReLU(), second, nn.LeakyReLU(0.1), tail)
    with caplog.at_level(logging.INFO, logger='oaq_plugin'):
        to_backend(model, 'triton_int8')
    assert backend_summary(model) == {'lattice': 'triton_int8', 'not_lattice': 'triton', 'transposed': 'reference'}
    lines = [r.getMessage() for r in caplog.records if r.name == 'oaq_plugin']
    assert len(lines) == 2
    assert "'not_lattice'" in lines[0] and 'triton backend' in lines[0] and 'not an int8 lattice' in lines[0]
    assert "'transposed'" in lines[1] and 'reference backend' in lines[1] and 'ConvTranspose2d' in lines[1]
    x = random_input((1, 8, 4, 5), scale=0.8)
    with torch.no_grad():
        int8_out = model(x)
        to_backend(model, 'reference')
        assert relative_error(int8_out, model(x)) < 1e-5


def test_decoded_weight_matches_the_reference_definition():
    """The kernel's weight integers times its step are the reference backend's decoded weight."""
    layer, _ = lattice_layer('conv-W8-uniform8-shifted')
    weight, _ = Int8Executor().prepare(layer)
    rebuilt = weight.integers().double() * weight.step.double()[:, None, None, None]
    assert torch.allclose(rebuilt, decode_weight(layer).double(), rtol=1e-6, atol=0)


def test_grids_of_the_integer_lattice_option_run_int8():
    """A model quantized with ``integer_lattice`` runs its lattice layers on int8 and matches the reference."""
    import dataclasses

    from layer_cases import CALIBRATION_ONLY, TinySR
    from oaq_plugin import OAQConfig, quantize
    if 'integer_lattice' not in {f.name for f in dataclasses.fields(OAQConfig)}:
        pytest.skip('this checkout has no integer_lattice option')
    torch.manual_seed(0)
    calibration = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = OAQConfig.from_dict({**CALIBRATION_ONLY, 'w_bits': 4, 'a_bits': 4, 'integer_lattice': True})
    qmodel = quantize(TinySR().eval(), calibration, config, progress=False)
    to_backend(qmodel, 'triton_int8')
    summary = backend_summary(qmodel)
    # The 4-bit body convs are on an int8 lattice; a grid whose tails need wider codes (the 8-bit ends, the
    # squeeze-excitation Linears of this tiny random model) falls back to the fp32-product kernel.
    assert summary['body.0'] == 'triton_int8' and summary['body.2'] == 'triton_int8'
    assert set(summary.values()) <= {'triton_int8', 'triton'}
    x = torch.rand(1, 3, 6, 7, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        int8_out = qmodel(x)
        to_backend(qmodel, 'reference')
        assert relative_error(int8_out, qmodel(x)) < 1e-5


def test_bench_cpu_check_runs_every_check(tmp_path):
    """tools/bench_kernels.py --cpu-check (one network, one dot precision, to stay quick) passes its checks."""
    import json

    from tiny_sr import load_tool
    bench = load_tool('bench_kernels')
    assert bench.main(['--cpu-check', '--precisions', 'tf32x3', '--networks', 'SRVGG', '--e2e-bits', 'W4A4',
                       '--out', str(tmp_path)]) == 0
    result = json.loads((tmp_path / 'bench_kernels.json').read_text())
    int8_layers = [r for r in result['layers'] if r['backend'] == 'triton int8' and 'accumulators_exact' in r]
    assert len(int8_layers) == 3 * len(bench.CPU_CHECK_SHAPES) * len(bench.INT8_LAYER_BITS)
    assert all(r['ok'] and r['accumulators_exact'] and r['fused_code_agreement'] == 1.0 for r in int8_layers)
    network = [r for r in result['end_to_end'] if r['backend'] == 'triton int8']
    assert len(network) == 1 and network[0]['ok'] and network[0]['int8_layers'] > 0
    assert {r['backend'] for r in result['end_to_end'] if 'skipped' in r} == {'TensorRT fp16', 'TensorRT int8'}
    assert [r['case'].split(' (')[0] for r in result['pipeline']] == ['IMDN x4', 'EDSR-M x4']
    assert all(r['timings']['reconstruction_s'] > 0 for r in result['pipeline'])
    assert 'Triton interpreter' in (tmp_path / 'bench_kernels.md').read_text()
