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


def _region_parts(x: torch.Tensor, offset: float, step: float, start: float, end: float
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(index, scaled)``: the rounded and unrounded grid position of ``clamp(x, start, end)``."""
    scaled = torch.clamp(x, start, end).sub_(offset).div_(step)
    return torch.round(scaled), scaled


def _region_value_tensor(x: torch.Tensor, offset: float, step: float, start: float, end: float) -> torch.Tensor:
    index, _ = _region_parts(x, offset, step, start, end)
    return index.mul_(step).add_(offset)


class _ClampedSumQuantize(torch.autograd.Function):
    """``q = Q_mid(clamp(x)) + sum over tails of (Q_tail(clamp(x)) - Q_tail(shared edge))``."""

    @staticmethod
    def forward(ctx, x, offsets, steps, layout):
        ranges, index_ranges, middle = layout
        offsets_f, steps_f = offsets.tolist(), steps.tolist()

        def part(r: int, values: torch.Tensor) -> torch.Tensor:
            start, end = ranges[r]
            return _region_value_tensor(values, offsets_f[r], steps_f[r], start, end)

        out = part(middle, x)
        for r in range(len(ranges)):
            if r == middle:
                continue
            # The tail's value at the edge it shares with the middle region, computed with the same
            # float arithmetic, so that values of the middle region come out exactly as the reference.
            edge = ranges[r][1] if r < middle else ranges[r][0]
            constant = part(r, x.new_full((1,), edge))
            out.add_(part(r, x).sub_(constant))
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
        outside = (x <= low_bound) | (x >= high_bound)
        grad_x = grad.masked_fill(outside, 0.0)
        grad_offsets = grad_steps = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            count = len(ranges)
            grad_steps = grad.new_zeros(count)
            grad_offsets = grad.new_zeros(count)
            flat_grad = grad.reshape(-1)
            for r, (start, end) in enumerate(ranges):
                index, scaled = _region_parts(x, offsets_f[r], steps_f[r], start, end)
                # Straight-through rounding inside the region: dq/dstep = round(v) - v. Values of other
                # regions sit on this region's end level, where round(v) - v is zero.
                grad_steps[r] = torch.dot(flat_grad, index.sub_(scaled).reshape(-1))
            # Clamped values: dq/doffset = 1 and dq/dstep = the clamped index, for the outer regions.
            sum_below = torch.where(x <= low_bound, grad, 0.0).sum()
            sum_above = torch.where(x >= high_bound, grad, 0.0).sum()
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
