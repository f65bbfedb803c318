"""Fake quantization for finetuning: a table look-up forward and a closed-form straight-through backward.

``RegionGrid.quantize`` rounds region by region and lets autograd record about twenty elementwise
operations per layer; on a CPU that costs several times the layer's convolution. Here the forward is one
``bucketize`` over the grid's decision boundaries plus one table read, and the backward computes the same
gradients as autograd through ``RegionGrid.quantize`` (rounding straight-through, clamped values passing
no gradient to the input) with a few per-code sums. Values lying exactly on a rounding boundary may
round the other way; that is irrelevant while training the parameters, and validation, export and the
kernels never use this path.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, List

import torch
from torch import nn

from ..quant.activation import ActivationQuantizer
from ..quant.layers import quant_layers
from ..quant.region_grid import Region, RegionGrid


def _code_tables(grid: RegionGrid) -> tuple:
    """Decision boundaries, and per code: region number, index inside the region, whether it is the
    region's first or last level.

    Returns ``(edges, spans, region_of_code, index_of_code, first_of_code, last_of_code)`` where code
    ``k`` holds the values in ``[edges[k-1], edges[k])`` and ``spans[r]`` is the range of codes of
    region ``r``.
    """
    inf = float('inf')
    regions = grid.regions()
    limits = []
    low_t = float(grid.low_threshold.detach()) if grid.low is not None else -inf
    high_t = float(grid.high_threshold.detach()) if grid.high is not None else inf
    for region in regions:
        if region is grid.low:
            limits.append((-inf, low_t))
        elif region is grid.high:
            limits.append((high_t, inf))
        else:
            limits.append((low_t, high_t))
    edges: List[float] = []
    region_of_code: List[int] = []
    index_of_code: List[int] = []
    first_of_code: List[bool] = []
    last_of_code: List[bool] = []
    spans: List[Tuple[int, int]] = []
    for number, (region, (start, end)) in enumerate(zip(regions, limits)):
        offset, step = float(region.offset.detach()), float(region.step.detach())
        first = len(region_of_code)
        # Indices whose rounding cell intersects the region's value range, in increasing order.
        for index in range(region.index_min, region.index_max + 1):
            cell_low = offset + (index - 0.5) * step if index > region.index_min else -inf
            cell_high = offset + (index + 0.5) * step if index < region.index_max else inf
            if cell_high <= start or cell_low >= end:
                continue
            if region_of_code:
                edges.append(max(cell_low, start))
            region_of_code.append(number)
            index_of_code.append(index)
            first_of_code.append(index == region.index_min)
            last_of_code.append(index == region.index_max)
        spans.append((first, len(region_of_code)))
    return (torch.tensor(edges, dtype=torch.float32), spans, torch.tensor(region_of_code),
            torch.tensor(index_of_code, dtype=torch.float32), torch.tensor(first_of_code),
            torch.tensor(last_of_code))


class _LookupQuantize(torch.autograd.Function):
    """``q = offset[r] + clamp(round((x - offset[r]) / step[r]), imin, imax) * step[r]`` by table look-up."""

    @staticmethod
    def forward(ctx, x, offsets, steps, edges, region_of_code, index_of_code, first_of_code, last_of_code):
        codes = torch.bucketize(x, edges, out_int32=True, right=True)
        code_offsets = offsets[region_of_code]
        code_steps = steps[region_of_code]
        levels = code_offsets + index_of_code * code_steps
        # Per code, the values beyond which the region clamps (infinite where the code is not an end).
        inf = torch.tensor(float('inf'), dtype=x.dtype)
        code_low = torch.where(first_of_code, levels, -inf)
        code_high = torch.where(last_of_code, levels, inf)
        ctx.inner_limits = bool(first_of_code[1:].any() or last_of_code[:-1].any())
        ctx.save_for_backward(x, codes, code_offsets, code_steps, index_of_code, region_of_code, code_low, code_high)
        ctx.num_regions = offsets.shape[0]
        return levels[codes]

    @staticmethod
    def backward(ctx, grad):
        x, codes, code_offsets, code_steps, index_of_code, region_of_code, code_low, code_high = ctx.saved_tensors
        last = index_of_code.shape[0] - 1
        # As RegionGrid.quantize clamps before rounding, values at or beyond a region's first or last
        # level are clamped: no gradient to the input there, and the offset gets it instead.
        if ctx.inner_limits:
            inside = (x > code_low[codes]) & (x < code_high[codes])
        else:
            inside = (x > code_low[0]) & (x < code_high[last])
        grad_x = torch.where(inside, grad, torch.zeros((), dtype=grad.dtype))
        grad_offsets = grad_steps = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_codes = codes.reshape(-1)
            size = index_of_code.shape[0]
            scaled = (x - code_offsets[codes]) / code_steps[codes]
            sum_grad = torch.bincount(flat_codes, weights=grad.reshape(-1), minlength=size)
            sum_inside = torch.bincount(flat_codes, weights=grad_x.reshape(-1), minlength=size)
            sum_scaled = torch.bincount(flat_codes, weights=(grad_x * scaled).reshape(-1), minlength=size)
            # Straight-through rounding of the clamped value: dq/dstep = round(v) - v inside, the
            # clamped index outside; dq/doffset = 0 inside, 1 outside.
            per_code_step = index_of_code * sum_grad - sum_scaled
            per_code_offset = sum_grad - sum_inside
            zeros = torch.zeros(ctx.num_regions, dtype=grad.dtype)
            grad_steps = zeros.index_add(0, region_of_code, per_code_step)
            grad_offsets = zeros.index_add(0, region_of_code, per_code_offset)
        return grad_x, grad_offsets, grad_steps, None, None, None, None, None


def lookup_quantize(grid: RegionGrid, x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``x`` on ``grid`` with the look-up forward and closed-form backward."""
    regions: List[Region] = grid.regions()
    edges, _, region_of_code, index_of_code, first_of_code, last_of_code = _code_tables(grid)
    offsets = torch.stack([r.offset.reshape(()) for r in regions]).to(x.dtype)
    steps = torch.stack([r.step.reshape(()) for r in regions]).to(x.dtype)
    device = x.device
    return _LookupQuantize.apply(x, offsets, steps, edges.to(device), region_of_code.to(device),
                                 index_of_code.to(device, x.dtype), first_of_code.to(device),
                                 last_of_code.to(device))


def _lookup_forward(self: ActivationQuantizer, x: torch.Tensor) -> torch.Tensor:
    return lookup_quantize(self.grid(), x)


@contextlib.contextmanager
def lookup_fake_quantization(qmodel: nn.Module) -> Iterator[None]:
    """While active, the activation quantizers of ``qmodel`` use :func:`lookup_quantize`."""
    patched = []
    for _, layer in quant_layers(qmodel):
        quantizer = layer.act_quantizer
        if 'forward' not in vars(quantizer):
            quantizer.forward = types.MethodType(_lookup_forward, quantizer)
            patched.append(quantizer)
    try:
        yield
    finally:
        for quantizer in patched:
            del quantizer.forward
