"""A value's code on a region grid inside a Triton kernel, and the grid's scalars as the kernels take them.

The arithmetic is that of ``oaq_plugin.backends.reference``: pick the value's region, then
``code = clamp(round((x - offset) / step), index_min, index_max) + shift``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import triton
import triton.language as tl

# Adding then subtracting 1.5 * 2^23 rounds an fp32 of magnitude below 2^22 to the nearest integer,
# ties to even, exactly as torch.round does; libdevice.rint is not available in the interpreter.
ROUND_MAGIC = tl.constexpr(12582912.0)

# An absent region: never selected, but the kernel still reads its five scalars.
_ABSENT_REGION = (0.0, 1.0, 0.0, 0.0, 0.0)


@triton.jit
def region_codes(x, grid, num_codes, HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr):
    """int32 codes in ``[0, num_codes)`` of fp32 values ``x`` on the grid packed by :func:`region_args`."""
    (mid_offset, mid_step, mid_min, mid_max, mid_shift,
     low_threshold, low_offset, low_step, low_min, low_max, low_shift,
     high_threshold, high_offset, high_step, high_min, high_max, high_shift) = grid
    # Pick each value's region first, so one division serves all three regions.
    offset = tl.zeros_like(x) + mid_offset
    step = tl.zeros_like(x) + mid_step
    lo = tl.zeros_like(x) + mid_min
    hi = tl.zeros_like(x) + mid_max
    shift = tl.zeros_like(x) + mid_shift
    if HAS_LOW:
        below = x < low_threshold
        offset = tl.where(below, low_offset, offset)
        step = tl.where(below, low_step, step)
        lo = tl.where(below, low_min, lo)
        hi = tl.where(below, low_max, hi)
        shift = tl.where(below, low_shift, shift)
    if HAS_HIGH:
        above = x > high_threshold
        offset = tl.where(above, high_offset, offset)
        step = tl.where(above, high_step, step)
        lo = tl.where(above, high_min, lo)
        hi = tl.where(above, high_max, hi)
        shift = tl.where(above, high_shift, shift)
    # Correctly rounded division: the code must match torch's (x - offset) / step bit for bit.
    index = tl.math.div_rn(x - offset, step)
    # Clamping to integer bounds before rounding gives the same index as rounding first.
    index = tl.minimum(tl.maximum(index, lo), hi)
    index = (index + ROUND_MAGIC) - ROUND_MAGIC
    code = (index + shift).to(tl.int32)
    # NaN inputs would otherwise index outside the table.
    return tl.minimum(tl.maximum(code, 0), num_codes - 1)


def _region(region: Optional[Tuple[float, ...]]) -> Tuple[float, ...]:
    return tuple(float(v) for v in region) if region is not None else _ABSENT_REGION


def region_args(grid) -> Tuple[float, ...]:
    """The ``grid`` argument of :func:`region_codes`: middle region, low threshold and region, high threshold
    and region.

    Args:
        grid: Anything with ``middle``, ``low``, ``high`` (``(offset, step, index_min, index_max, shift)`` or
            ``None`` when absent), ``low_threshold`` and ``high_threshold``; ``None`` for no grid at all
            (the kernel then never reads it).
    """
    if grid is None:
        return _region(None) + (float('-inf'),) + _region(None) + (float('inf'),) + _region(None)
    return _region(grid.middle) + (float(grid.low_threshold),) + _region(grid.low) + \
        (float(grid.high_threshold),) + _region(grid.high)
