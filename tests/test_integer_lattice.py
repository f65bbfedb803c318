"""Activation grids on an integer lattice (oaq.integer_lattice): every level is ``u * n`` with an integer
code in int8 (int16 where int8 cannot hold the grid), idempotent and monotone, trained through every stage."""
from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oaq_plugin import OAQConfig, quantize
from oaq_plugin.backends.select import to_backend
from oaq_plugin.quant import DualRegionQuantizer, UniformQuantizer, WeightQuantizer, quant_layers
from oaq_plugin.quant.activation import activation_quantizers
from oaq_plugin.quant.fast_fake_quant import fast_quantize
from oaq_plugin.quant.integer_lattice import STORAGES, lattice_codes, to_lattice, weight_lattice
from tiny_sr import tiny_pipeline_world

BITS = st.integers(min_value=2, max_value=8)
# (lower, upper, breakpoint as a fraction of the larger bound, dense centre as a fraction of the breakpoint)
PARAMS = st.tuples(st.floats(-300, 0), st.floats(1e-3, 300), st.floats(1e-3, 1.0), st.floats(-0.5, 0.5))


def lattice_dual(bits, lower, upper, frac, center=0.0, levels='paper'):
    q = DualRegionQuantizer(bits, levels=levels, integer_lattice=True)
    q.set_bounds(lower, upper)
    bp = frac * max(abs(lower), abs(upper))
    q.set_breakpoint(bp)
    q.set_center(center * bp)
    return q


def check_lattice(q, span):
    """Every level is u*n exactly, codes fit the storage, Q is idempotent and monotone, codes decode to Q."""
    grid = q.grid()
    lattice = grid.lattice
    assert lattice is not None
    n = lattice_codes(grid)
    levels = grid.level_table()
    assert torch.equal(levels, lattice.unit * n.float())
    low, high = lattice.code_range
    assert low <= int(n.min()) + lattice.zero_point and int(n.max()) + lattice.zero_point <= high
    x = torch.linspace(span[0], span[1], 4001)
    y = q(x)
    assert torch.equal(q(y), y)
    assert bool((y[1:] >= y[:-1]).all())
    assert torch.equal(levels[grid.encode(x)], y)
    return grid


@settings(max_examples=80, deadline=None)
@given(bits=BITS, p=PARAMS, levels=st.sampled_from(['paper', 'pwlq']))
@example(bits=4, p=(-3.0, 16.0, 1 / 16, 0.0), levels='paper')
def test_dual_region_lattice_is_exact_idempotent_monotone(bits, p, levels):
    lower, upper, frac, center = p
    q = lattice_dual(bits, lower, upper, frac, center if levels == 'paper' else 0.0, levels)
    extent = max(abs(lower), abs(upper), 1e-3)
    grid = q.grid()
    if levels == 'pwlq':
        # The pwlq tails overlap the middle region at its ends: idempotent only within a step there (README).
        n = lattice_codes(grid)
        assert torch.equal(grid.level_table(), grid.lattice.unit * n.float())
        return
    check_lattice(q, (-1.5 * extent, 1.5 * extent))


@settings(max_examples=40, deadline=None)
@given(bits=BITS, below_zero=st.floats(-0.5, 1.5), width=st.floats(1e-3, 100))
def test_uniform_lattice_is_exact_and_keeps_the_step(bits, below_zero, width):
    # Ranges that hold zero or lie near it, as activations do: the lattice holds zero as ``n = 0``.
    lower = -below_zero * width
    q = UniformQuantizer(bits, integer_lattice=True)
    q.set_bounds(lower, lower + width)
    grid = check_lattice(q, (lower - width, lower + 2 * width))
    float_grid = q.parameter_grid()
    # A uniform grid keeps its step (unit = step, up to a finer divisor) and moves by at most half a unit.
    moved = (grid.level_table() - float_grid.level_table()).abs().max()
    assert float(moved) <= 0.5 * float(grid.lattice.unit) * (1 + 1e-4) + 1e-6 * width


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 6), p=PARAMS)
def test_levels_move_by_a_fraction_of_their_region(bits, p):
    lower, upper, frac, center = p
    q = lattice_dual(bits, lower, upper, frac, center)
    grid, float_grid = q.grid(), q.parameter_grid()
    unit = float(grid.lattice.unit)
    span = max(r.index_max - r.index_min for r in float_grid.regions())
    moved = float((grid.level_table() - float_grid.level_table()).abs().max())
    extent = max(abs(lower), abs(upper))
    # The anchored level moves by at most half a unit, each further step by at most half a unit.
    assert moved <= 0.5 * unit * (span + 2) + 1e-5 * extent


def test_four_bit_tails_to_sixteen_breakpoints_fit_int8_and_eight_bit_dual_region_needs_int16():
    for ratio in (3, 8, 16):
        q = lattice_dual(4, -ratio, ratio, 1 / ratio)
        assert q.grid().lattice.bits == 8
        assert q.grid().lattice.zero_point == 0
    q = lattice_dual(8, -16, 16, 1 / 16)
    assert q.grid().lattice.bits == 16
    uniform = UniformQuantizer(8, integer_lattice=True)
    uniform.set_bounds(-0.3, 5.1)
    assert uniform.grid().lattice.bits == 8


def test_off_by_default_and_the_float_grid_is_untouched():
    assert OAQConfig().integer_lattice is False
    assert OAQConfig.from_dict({'preset': 'paper'}).integer_lattice is False
    q = DualRegionQuantizer(4)
    q.set_bounds(-3, 16)
    q.set_breakpoint(1.0)
    assert q.grid().lattice is None
    assert to_lattice(q.grid()).lattice is not None


def test_gradients_pass_straight_through_the_snapping():
    torch.manual_seed(0)
    x = torch.randn(20000) * 3
    x[:200] *= 8
    q = lattice_dual(4, float(x.min()), float(x.max()), 0.1)
    reference = DualRegionQuantizer(4)
    reference.load_state_dict(q.state_dict())
    for quantizer in (q, reference):
        ((quantizer(x) - x) ** 2).mean().backward()
    for name in ('lower', 'upper', 'breakpoint'):
        got, want = getattr(q, name).grad, getattr(reference, name).grad
        assert torch.isfinite(got) and float(got.abs()) > 0
        assert torch.allclose(got, want, rtol=0.3, atol=1e-3 * float(want.abs()) + 1e-6), name
    # Training the lattice grid lowers its error.
    optimizer = torch.optim.Adam([q.lower, q.upper, q.breakpoint], lr=0.05)
    with torch.no_grad():
        before = float(((q(x) - x) ** 2).mean())
    for _ in range(30):
        optimizer.zero_grad()
        ((q(x) - x) ** 2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        assert float(((q(x) - x) ** 2).mean()) < before
    assert q.grid().lattice is not None


def test_fast_fake_quantization_follows_the_lattice():
    q = lattice_dual(4, -5, 16, 1 / 16)
    grid = q.grid()
    x = torch.randn(50000) * 4
    assert torch.allclose(fast_quantize(grid, x), grid.quantize(x), atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(bits=BITS, grid_kind=st.sampled_from(['paper', 'zero']), seed=st.integers(0, 1000))
def test_weight_codes_map_to_integers(bits, grid_kind, seed):
    torch.manual_seed(seed)
    weight = torch.randn(6, 3, 3, 3)
    quantizer = WeightQuantizer(bits, grid=grid_kind)
    quantizer.initialize(weight)
    codes, step, zero_point = quantizer.integer_codes(weight)
    mapped = weight_lattice(codes, step, zero_point)
    decoded = (codes.float() - zero_point) * step
    assert torch.allclose(mapped.n.float() * mapped.scale, decoded, rtol=1e-6, atol=0)
    low, high = dict((b, (lo, hi)) for b, lo, hi in STORAGES)[mapped.bits]
    assert low <= int(mapped.n.min()) and int(mapped.n.max()) <= high
    assert mapped.bits == (8 if bits <= 7 or grid_kind == 'zero' else 16)


def test_every_stage_keeps_the_lattice_and_backends_agree():
    model, batches, config = tiny_pipeline_world({
        'w_bits': 4, 'a_bits': 4, 'integer_lattice': True,
        'search': {'enabled': True, 'num_samples': 2, 'window': 8, 'grid_size': 4, 'refine_rounds': 0},
        'rounding': {'enabled': True, 'iterations': 5, 'num_samples': 2, 'window': 8, 'batch_size': 2},
        'reconstruction': {'enabled': True, 'iterations': 5, 'num_samples': 4, 'patch_size': 8, 'batch_size': 2},
        'distillation': {'enabled': True, 'iterations': 5, 'patch_size': 8, 'batch_size': 2, 'check_crops': 2},
        'finetune': {'enabled': True, 'epochs': 3, 'iters_per_epoch': 1, 'batch_size': 1, 'patch_size': 12,
                     'tap_samples': 2}})
    qmodel = quantize(model, batches, config)
    quantizers = activation_quantizers(qmodel)
    assert quantizers
    for _, quantizer in quantizers:
        assert quantizer.integer_lattice
        grid = quantizer.grid()
        assert grid.lattice is not None
        assert torch.equal(grid.level_table(), grid.lattice.unit * lattice_codes(grid).float())
    x = batches[0][:1]
    with torch.no_grad():
        fake = qmodel(x)
        to_backend(qmodel, 'reference')
        reference = qmodel(x)
    assert torch.allclose(fake, reference, atol=1e-5, rtol=1e-5)
    assert all(layer.executor_name == 'reference' for _, layer in quant_layers(qmodel))
