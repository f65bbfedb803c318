"""Math of the quantizers (docs/METHOD.md, Dual-region activation quantizer; Weight quantizer): level counts,
errors, idempotence, monotonicity, degenerate input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oaq_plugin.quant import DualRegionQuantizer, UniformQuantizer, WeightQuantizer, level_counts

BITS = st.integers(min_value=2, max_value=8)


def dual(bits, lower, upper, bp, levels='paper'):
    q = DualRegionQuantizer(bits, levels=levels)
    q.set_bounds(lower, upper)
    q.set_breakpoint(bp)
    return q


def heavy_tailed(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10
    k = n // 100
    tails = torch.empty(k).uniform_(150, 300, generator=g) * torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    x[:k] = tails
    return x[torch.randperm(n, generator=g)]


params = st.tuples(st.floats(-300, -1e-3), st.floats(1e-3, 300), st.floats(1e-3, 1.0))


@settings(max_examples=60, deadline=None)
@given(bits=BITS, p=params, levels=st.sampled_from(['paper', 'pwlq']))
def test_distinct_levels_bounded(bits, p, levels):
    lower, upper, frac = p
    bp = frac * max(-lower, upper)
    q = dual(bits, lower, upper, bp, levels)
    x = torch.linspace(lower * 1.5, upper * 1.5, 20001)
    distinct = torch.unique(q(x)).numel()
    limit = 2 ** bits if levels == 'paper' else 2 ** (bits + 1)
    assert distinct <= limit
    assert q.grid().num_codes <= limit


@settings(max_examples=60, deadline=None)
@given(bits=BITS, p=params)
# A one-sided 2-bit grid whose top middle level, as computed, lay an ulp above the breakpoint: the quantized
# value then fell into the one-level tail.
@example(bits=2, p=(-8.101159593875366, 95.71333358170862, 0.25))
def test_paper_levels_idempotent_and_monotone(bits, p):
    lower, upper, frac = p
    q = dual(bits, lower, upper, frac * max(-lower, upper))
    x = torch.linspace(lower * 1.2, upper * 1.2, 5001)
    y = q(x)
    assert torch.allclose(q(y), y, atol=1e-4 * max(-lower, upper))
    assert bool((y[1:] >= y[:-1] - 1e-6 * max(-lower, upper)).all())


@settings(max_examples=60, deadline=None)
@given(bits=BITS, p=params)
def test_pwlq_deviates_at_most_one_dense_step_at_the_breakpoint(bits, p):
    # The released pwlq grids overlap at +-bp (its signed dense grid reaches -bp*2^b/(2^b-1) and the tails
    # start at +-bp), so it is idempotent and monotone only up to one dense step there.
    lower, upper, frac = p
    q = dual(bits, lower, upper, frac * max(-lower, upper), 'pwlq')
    x = torch.linspace(lower * 1.2, upper * 1.2, 5001)
    y = q(x)
    slack = float(q.grid().middle.step.detach()) * (1 + 1e-4) + 1e-5
    assert float((q(y) - y).abs().max().detach()) <= slack
    assert bool((y[1:] >= y[:-1] - slack).all())


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(3, 8), p=params)
def test_error_within_half_step_inside_regions(bits, p):
    lower, upper, frac = p
    q = dual(bits, lower, upper, frac * min(-lower, upper))
    grid = q.grid()
    x = torch.linspace(lower, upper, 10001)
    error = (q(x) - x).abs()
    for region in grid.regions():
        levels = region.levels()
        inside = (x >= levels.min()) & (x <= levels.max())
        if grid.low is region:
            inside &= x < grid.low_threshold
        elif grid.high is region:
            inside &= x > grid.high_threshold
        elif grid.low is not None or grid.high is not None:
            if grid.low is not None:
                inside &= x >= grid.low_threshold
            if grid.high is not None:
                inside &= x <= grid.high_threshold
        if inside.any():
            assert float(error[inside].max()) <= float(region.step) / 2 * (1 + 1e-4) + 1e-5


def test_paper_allocation_counts():
    q = dual(4, -200.0, 250.0, 30.0)
    grid = q.grid()
    assert grid.middle.num_levels == 8 and grid.low.num_levels == 4 and grid.high.num_levels == 4
    assert math.isclose(float(grid.middle.step), 60.0 / 7, rel_tol=1e-6)
    assert math.isclose(float(grid.low.step), 170.0 / 3, rel_tol=1e-6)
    assert math.isclose(float(grid.high.step), 220.0 / 3, rel_tol=1e-6)
    assert level_counts(4, 'pwlq') == (16, 8)


def test_pwlq_dense_is_signed_grid():
    q = dual(4, -200.0, 250.0, 30.0, 'pwlq')
    grid = q.grid()
    assert (grid.middle.index_min, grid.middle.index_max) == (-8, 7)
    assert math.isclose(float(grid.middle.step), 60.0 / 15, rel_tol=1e-6)
    assert grid.low.num_levels == 8 and grid.high.num_levels == 8


def test_one_sided_after_relu_uses_two_regions_same_total():
    q = dual(4, 0.0, 100.0, 10.0)
    grid = q.grid()
    assert grid.low is None and grid.high is not None
    assert grid.num_codes == 16
    assert float(grid.middle.levels().min()) == 0.0
    assert math.isclose(float(grid.middle.levels().max()), 10.0, rel_tol=1e-6)


@pytest.mark.parametrize('lower,upper,bp', [
    (-5.0, 5.0, 0.0),       # bp <= 0
    (-5.0, 5.0, -1.0),
    (-5.0, 5.0, 7.0),       # bp beyond both bounds
    (3.0, 3.0, 1.0),        # constant tensor
    (-2.0, 2.0, 2.0),       # empty tails
])
def test_degenerate_falls_back_to_uniform(lower, upper, bp):
    q = dual(4, lower, upper, bp)
    assert q.is_degenerate()
    grid = q.grid()
    assert grid.low is None and grid.high is None and grid.num_codes == 16
    x = torch.linspace(-10, 10, 1001)
    y = q(x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize('values', [
    torch.full((2, 3, 8, 8), 4.2),                         # constant
    torch.rand(2, 3, 8, 8) * 5,                            # one-signed
    -torch.rand(2, 3, 8, 8) * 5,                           # one-signed, negative
    torch.randn(2, 3, 8, 8) * 1e-6,                        # tiny
    torch.randn(2, 3, 8, 8) * 1e6,                         # huge
    torch.zeros(2, 3, 8, 8),
])
@pytest.mark.parametrize('make', [
    lambda: DualRegionQuantizer(4), lambda: DualRegionQuantizer(4, levels='pwlq'),
    lambda: UniformQuantizer(4, 'minmax'), lambda: UniformQuantizer(4, 'percentile'), lambda: UniformQuantizer(4, 'mse'),
])
def test_calibrated_quantizers_never_produce_nan(values, make):
    q = make()
    q.observe(values)
    q.initialize()
    out = q(values)
    assert torch.isfinite(out).all()
    for p in q.parameters():
        assert torch.isfinite(p).all()
    scale = max(float(values.abs().max()), 1e-6)
    assert float((out - values).abs().max()) <= scale + 1e-6


def test_gradients_reach_all_parameters():
    q = dual(4, -200.0, 250.0, 30.0)
    x = heavy_tailed(20_000)
    q(x).pow(2).mean().backward()
    for name in ('lower', 'upper', 'breakpoint'):
        grad = getattr(q, name).grad
        assert grad is not None and torch.isfinite(grad) and float(grad) != 0.0, name


def test_dual_region_beats_minmax_on_heavy_tails():
    x = heavy_tailed()
    d = DualRegionQuantizer(4)
    u = UniformQuantizer(4, 'minmax')
    for q in (d, u):
        for chunk in x.split(50_000):
            q.observe(chunk.reshape(5, -1))
        q.initialize()
    mse_dual = float(((d(x) - x) ** 2).mean())
    mse_minmax = float(((u(x) - x) ** 2).mean())
    assert mse_dual < 0.25 * mse_minmax, (mse_dual, mse_minmax)


def test_uniform_methods_order_of_ranges():
    x = heavy_tailed().reshape(4, -1)
    ranges = {}
    for method in ('minmax', 'percentile', 'mse'):
        q = UniformQuantizer(4, method)
        q.observe(x)
        q.initialize()
        ranges[method] = (float(q.lower), float(q.upper))
        mse = float(((q(x) - x) ** 2).mean())
        ranges[method] += (mse,)
    assert ranges['minmax'][1] >= ranges['mse'][1] >= 0
    assert ranges['percentile'][1] < ranges['minmax'][1]
    assert ranges['mse'][2] <= ranges['minmax'][2]


@settings(max_examples=30, deadline=None)
@given(bits=BITS, granularity=st.sampled_from(['channel', 'tensor']), grid=st.sampled_from(['paper', 'zero']))
def test_weight_quantizer_levels_and_codes(bits, granularity, grid):
    torch.manual_seed(bits)
    w = torch.randn(6, 4, 3, 3)
    q = WeightQuantizer(bits, granularity=granularity, grid=grid)
    q.initialize(w)
    wq = q(w)
    for c in range(6):
        assert torch.unique(wq[c]).numel() <= q.num_levels
    codes, step, zero_point = q.integer_codes(w)
    assert int(codes.max()) <= q.num_levels - 1
    assert torch.allclose((codes.float() - zero_point) * step, wq, atol=1e-6)
    if grid == 'zero':
        assert torch.allclose(q(torch.zeros_like(w)), torch.zeros_like(w))


def test_weight_shrink_search_not_worse_than_max():
    torch.manual_seed(0)
    w = torch.randn(8, 8, 3, 3)
    w[0, 0, 0, 0] = 12.0
    q = WeightQuantizer(4, granularity='tensor')
    q.initialize(w)
    error_searched = float(((q(w) - w) ** 2).sum())
    error_max = float(((q.quantize_with(w, w.abs().max()) - w) ** 2).sum())
    assert error_searched < error_max
    assert float(q.clip) < 12.0


def test_per_channel_beats_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(8, 8, 3, 3) * torch.logspace(-2, 0, 8).reshape(8, 1, 1, 1)
    errors = {}
    for granularity in ('channel', 'tensor'):
        q = WeightQuantizer(4, granularity=granularity)
        q.initialize(w)
        errors[granularity] = float(((q(w) - w) ** 2).sum())
    assert errors['channel'] < errors['tensor']


def test_zero_weight_channel_is_finite():
    w = torch.randn(4, 3, 3, 3)
    w[1] = 0
    q = WeightQuantizer(4)
    q.initialize(w)
    assert torch.isfinite(q(w)).all()
    assert torch.allclose(q(w)[1], torch.zeros_like(w[1]), atol=1e-6)


def test_dense_center_shifts_the_dense_region_and_keeps_the_code_count():
    q = dual(4, -20.0, 100.0, 10.0)
    q.set_center(30.0)
    grid = q.grid()
    assert not q.is_degenerate()
    assert math.isclose(float(grid.low_threshold.detach()), 20.0, rel_tol=1e-6)
    assert math.isclose(float(grid.high_threshold.detach()), 40.0, rel_tol=1e-6)
    assert grid.num_codes == 16
    assert math.isclose(float(grid.middle.levels().min().detach()), 20.0, rel_tol=1e-6)
    assert math.isclose(float(grid.middle.levels().max().detach()), 40.0, rel_tol=1e-6)
    x = torch.linspace(-20.0, 100.0, 1001)
    assert len(torch.unique(q(x).detach())) <= 16
    # A region that covers the whole range is the degenerate (uniform) case.
    q.set_center(40.0)
    q.set_breakpoint(70.0)
    assert q.is_degenerate()


def test_state_dicts_carry_the_center_and_one_without_it_is_refused():
    q = dual(4, -20.0, 100.0, 10.0)
    q.set_center(5.0)
    fresh = dual(4, -20.0, 100.0, 10.0)
    fresh.load_state_dict(q.state_dict())
    assert float(fresh.dense_center) == 5.0
    # Every saved quantizer has had a centre since the first release: a state without one is not ours.
    state = {k: v for k, v in q.state_dict().items() if k != 'dense_center'}
    with pytest.raises(RuntimeError, match='dense_center'):
        dual(4, -20.0, 100.0, 10.0).load_state_dict(state)
