"""Fast fake quantization: region selection by clamping with a closed-form backward (for training), and
a table look-up (for scoring search candidates).

``RegionGrid.quantize`` picks each value's region with ``torch.where`` and lets autograd record about
twenty elementwise operations per layer; on a CPU that costs several times the layer's convolution.
When the grid is continuous at its thresholds (each region ends on the level where the next begins:
the ``paper`` allocation, one-sided and uniform grids), the quantized value is a sum of per-region
quantizers of ``x`` clamped to each region, which needs only cheap arithmetic:

    q(x) = Q_mid(clamp(x, t_low, t_high)) + [Q_low(clamp(x, -inf, t_low)) - Q_low(t_low)]
                                          + [Q_high(clamp(x, t_high, inf)) - Q_high(t_high)]

The backward gives the gradients of ``RegionGrid.quantize`` (rounding straight-through, values beyond
the outer bounds clamped) in closed form. Results agree with the reference up to float rounding (a
value within an ulp of a rounding boundary may round the other way); validation, export and the
kernels never use this path. Grids that are not continuous (``pwlq``) use the reference arithmetic.
An activation quantizer uses it while its ``fast`` switch is on
(:func:`~oaq_plugin.quant.activation.fast_fake_quantization`).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from .region_grid import Region, RegionGrid

# Relative tolerance of the continuity test between adjacent regions.
CONTINUITY_TOLERANCE = 1e-5


def _region_value(region: Region, value: float) -> float:
    offset, step = float(region.offset.detach()), float(region.step.detach())
    index = min(max(round((value - offset) / step), region.index_min), region.index_max)
    return offset + index * step


def _clamp_ranges(grid: RegionGrid) -> Optional[List[Tuple[float, float]]]:
    """Per region (code order) the interval its input is clamped to, or ``None`` if the grid is not
    continuous at a threshold (then the clamped sum is not the grid's quantizer).

    The outer intervals end at the grid's first and last levels, so that no region needs its index
    clamped: clamping the input already keeps it on the region's levels.
    """
    regions = grid.regions()
    low_t = float(grid.low_threshold.detach()) if grid.low is not None else None
    high_t = float(grid.high_threshold.detach()) if grid.high is not None else None
    first, last = regions[0], regions[-1]
    lowest = float(first.offset.detach()) + first.index_min * float(first.step.detach())
    highest = float(last.offset.detach()) + last.index_max * float(last.step.detach())
    edges = [lowest] + [t for t in (low_t, high_t) if t is not None] + [highest]
    if any(b < a for a, b in zip(edges[:-1], edges[1:])):
        return None
    bounds = list(zip(edges[:-1], edges[1:]))
    for left, right, (_, edge) in zip(regions[:-1], regions[1:], bounds[:-1]):
        a, b = _region_value(left, edge), _region_value(right, edge)
        if not math.isclose(a, b, rel_tol=CONTINUITY_TOLERANCE, abs_tol=CONTINUITY_TOLERANCE * abs(edge) + 1e-12):
            return None
        # Each region must reach the shared edge with its own levels, or clamping would cut levels off.
        if not (math.isclose(a, edge, rel_tol=CONTINUITY_TOLERANCE, abs_tol=1e-12)):
            return None
    return bounds


def _region_position(x: torch.Tensor, offset: float, step: float, start: float, end: float,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The unrounded grid position ``(clamp(x, start, end) - offset) / step``, written into ``out`` when given
    (a new tensor otherwise), then computed in place."""
    position = torch.clamp(x, start, end) if out is None else torch.clamp(x, start, end, out=out)
    return position.sub_(offset).div_(step)


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value`` (as rounded to ``dtype``): ``x >= value`` is ``x >
    _below(value)``."""
    bound = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(bound, torch.tensor(-math.inf, dtype=dtype)))


class _ClampedSumQuantize(torch.autograd.Function):
    """``q = Q_mid(clamp(x)) + sum over tails of step * (index(clamp(x)) - index at the shared edge)``.

    Written for a CPU, where every pass over an activation tensor and every new tensor of its size counts
    (a fresh allocation of a few MB costs more than the arithmetic on it): rounding in place, the tails
    computed in one reused buffer and each added with one scaled add, and the backward's masks taken from
    the fused ``hardtanh_backward`` and ``threshold_backward`` kernels (comparisons that produce boolean
    tensors cost many times a pass).
    """

    @staticmethod
    def forward(ctx, x, offsets, steps, layout):
        ranges, index_ranges, middle = layout
        offsets_f, steps_f = offsets.tolist(), steps.tolist()
        start, end = ranges[middle]
        out = _region_position(x, offsets_f[middle], steps_f[middle], start, end).round_()
        out.mul_(steps_f[middle]).add_(offsets_f[middle])
        buffer = torch.empty_like(x) if len(ranges) > 1 else None
        for r, (start, end) in enumerate(ranges):
            if r == middle:
                continue
            # The tail's index at the edge it shares with the middle region, with the same float arithmetic
            # as the tensor's values there: values of the middle region add exactly zero and come out as in
            # the reference.
            edge = end if r < middle else start
            edge_index = float(_region_position(x.new_full((1,), edge), offsets_f[r], steps_f[r], start, end).round_())
            index = _region_position(x, offsets_f[r], steps_f[r], start, end, buffer).round_().sub_(edge_index)
            out.add_(index, alpha=steps_f[r])
        ctx.layout = layout
        ctx.offsets_f, ctx.steps_f = offsets_f, steps_f
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ranges, index_ranges, _ = ctx.layout
        offsets_f, steps_f = ctx.offsets_f, ctx.steps_f
        first, last = 0, len(ranges) - 1
        low_bound = offsets_f[first] + index_ranges[first][0] * steps_f[first]
        high_bound = offsets_f[last] + index_ranges[last][1] * steps_f[last]
        # Values at or beyond the outer levels are clamped: no gradient to the input there.
        grad_x = torch.ops.aten.hardtanh_backward(grad, x, low_bound, high_bound)
        grad_offsets = grad_steps = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            count = len(ranges)
            grad_steps = grad.new_zeros(count)
            grad_offsets = grad.new_zeros(count)
            flat_grad = grad.reshape(-1)
            position, rounded = torch.empty_like(x), torch.empty_like(x)
            for r, (start, end) in enumerate(ranges):
                _region_position(x, offsets_f[r], steps_f[r], start, end, position)
                # Straight-through rounding inside the region: dq/dstep = round(v) - v. Values of other
                # regions sit on this region's end level, where round(v) - v is zero.
                torch.round(position, out=rounded)
                grad_steps[r] = torch.dot(flat_grad, rounded.sub_(position).reshape(-1))
            # Clamped values: dq/doffset = 1 and dq/dstep = the clamped index, for the outer regions.
            masked = torch.ops.aten.threshold_backward.grad_input
            sum_below = grad.sum() - masked(grad, x, low_bound, grad_input=position).sum()
            sum_above = masked(grad, x, _below(high_bound, x.dtype), grad_input=position).sum()
            grad_offsets[first] += sum_below
            grad_steps[first] += index_ranges[first][0] * sum_below
            grad_offsets[last] += sum_above
            grad_steps[last] += index_ranges[last][1] * sum_above
        return grad_x, grad_offsets, grad_steps, None


def fast_quantize(grid: RegionGrid, x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``x`` on ``grid``: the clamped-sum forward and closed-form backward when the grid is
    continuous, the reference arithmetic otherwise."""
    ranges = _clamp_ranges(grid)
    if ranges is None or x.dtype not in (torch.float32, torch.float64):
        return grid.quantize(x)
    regions = grid.regions()
    offsets = torch.stack([r.offset.reshape(()) for r in regions]).to(x.dtype)
    steps = torch.stack([r.step.reshape(()) for r in regions]).to(x.dtype)
    layout = (tuple(ranges), tuple((r.index_min, r.index_max) for r in regions), regions.index(grid.middle))
    return _ClampedSumQuantize.apply(x, offsets, steps, layout)


def lookup_quantizer(grid: RegionGrid) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fake quantization by one table look-up: the grid's decision boundaries and the level of each cell.

    Equal to ``grid.quantize`` except for values lying exactly on a rounding boundary; used only to
    score search candidates, where that difference does not matter and the look-up is several times
    cheaper than the region-by-region arithmetic.
    """
    with torch.no_grad():
        boundaries: List[float] = []
        spans: List[Tuple[object, float, float]] = []
        inf = float('inf')
        low_t = float(grid.low_threshold) if grid.low is not None else -inf
        high_t = float(grid.high_threshold) if grid.high is not None else inf
        if grid.low is not None:
            spans.append((grid.low, -inf, low_t))
            boundaries.append(low_t)
        spans.append((grid.middle, low_t, high_t))
        if grid.high is not None:
            spans.append((grid.high, high_t, inf))
            boundaries.append(high_t)
        for region, start, end in spans:
            offset, step = float(region.offset), float(region.step)
            for index in range(region.index_min, region.index_max):
                edge = offset + (index + 0.5) * step
                if start < edge < end:
                    boundaries.append(edge)
        edges = torch.tensor(sorted(set(boundaries)), dtype=torch.float32)
        if edges.numel() == 0:
            level = grid.quantize(torch.zeros(1)).reshape(1)
            return lambda x: level.expand_as(x).clone()
        middles = (edges[1:] + edges[:-1]) / 2
        width = float(edges[-1] - edges[0]) + 1.0
        representatives = torch.cat([edges[:1] - width, middles, edges[-1:] + width])
        levels = grid.quantize(representatives)

    def quantize(x: torch.Tensor) -> torch.Tensor:
        return levels[torch.bucketize(x, edges.to(x.device), right=True)]

    levels = levels.contiguous()
    return quantize
