"""The dual-region activation quantizer (docs/METHOD.md, Dual-region activation quantizer): a dense region
and two outlier tails."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LEVELS, CalibConfig, OAQConfig
from .activation import ActivationQuantizer
from .observer import ObservedStats
from .region_grid import MIN_STEP, Region, RegionGrid, endpoint_region


def level_counts(bits: int, levels: str) -> tuple:
    """``(dense, per_tail)`` level counts: paper 2^(b-1) and 2^(b-2); pwlq 2^b and 2^(b-1)."""
    if levels == 'paper':
        return 2 ** (bits - 1), max(1, 2 ** (bits - 2))
    if levels == 'pwlq':
        return 2 ** bits, 2 ** (bits - 1)
    raise ValueError(f'levels must be one of {LEVELS}, got {levels!r}')


class DualRegionQuantizer(ActivationQuantizer):
    """Dense region ``[-bp, bp]`` and outlier tails ``[lower, -bp)``, ``(bp, upper]``, each uniform.

    ``lower``, ``upper`` and ``breakpoint`` are parameters; rounding is straight-through so
    finetuning trains them. The one-sided case (``lower >= -bp`` or ``upper <= bp``) uses two affine
    regions with the same total number of levels; degenerate parameters (``bp <= 0``, ``bp`` beyond
    both bounds, a collapsed range) fall back to a uniform grid over ``[lower, upper]``.

    Beyond the paper, the buffer ``dense_center`` (``c``, 0 by default: the paper's region) moves the
    dense region to ``[c - bp, c + bp]`` for skewed inputs; the search stage sets it.

    Args:
        bits: Activation bits b.
        levels: ``paper`` (2^b codes, an honest b-bit code) or ``pwlq`` (2^(b+1) codes: (b+1)-bit).
        breakpoint_stat: Initial breakpoint from the percentile of ``signed`` values or of ``abs`` values.
        **kwargs: Observer settings (see :class:`ActivationQuantizer`).
    """

    def __init__(self, bits: int, levels: str = OAQConfig.levels, breakpoint_stat: str = CalibConfig.breakpoint_stat,
                 **kwargs) -> None:
        super().__init__(bits, **kwargs)
        level_counts(bits, levels)
        self.levels = levels
        self.breakpoint_stat = breakpoint_stat
        self.breakpoint = nn.Parameter(torch.tensor(0.5))
        # Fraction of the levels given to the middle region; None keeps the paper/pwlq split.
        self.register_buffer('dense_share', torch.tensor(float('nan')))
        # Centre of the dense region; 0 is the paper's symmetric [-bp, bp].
        self.register_buffer('dense_center', torch.tensor(0.0))

    def set_center(self, value: float) -> None:
        with torch.no_grad():
            self.dense_center.fill_(float(value))

    def _initialize_from(self, stats: ObservedStats, sample: torch.Tensor) -> None:
        bp = stats.quantile_abs if self.breakpoint_stat == 'abs' else stats.quantile_high
        self.set_bounds(stats.minimum, stats.maximum)
        self.set_breakpoint(bp)

    def set_breakpoint(self, value: float) -> None:
        with torch.no_grad():
            self.breakpoint.fill_(float(value))

    def counts(self) -> tuple:
        """``(dense, per_tail)`` level counts, with a searched split applied when one is set."""
        dense, tail = level_counts(self.bits, self.levels)
        share = float(self.dense_share)
        if not math.isnan(share):
            total = dense + 2 * tail
            tail = max(1, int(round(total * (1.0 - share) / 2)))
            dense = total - 2 * tail
        return dense, tail

    def is_degenerate(self) -> bool:
        lower, upper, bp, center = (float(t.detach()) for t in (self.lower, self.upper, self.breakpoint,
                                                                self.dense_center))
        if not all(math.isfinite(v) for v in (lower, upper, bp, center)):
            return True
        if bp <= 0 or upper - lower <= MIN_STEP:
            return True
        return lower >= center - bp and upper <= center + bp

    def _dense_edges(self) -> tuple:
        """``(low, high)`` edges of the dense region, as expressions of the parameters."""
        bp = self.breakpoint
        if float(self.dense_center) == 0.0:
            return -bp, bp
        return self.dense_center - bp, self.dense_center + bp

    def parameter_grid(self) -> RegionGrid:
        lower, upper, bp = self.lower, self.upper, self.breakpoint
        dense, tail = self.counts()
        total = dense + 2 * tail
        if self.is_degenerate():
            return RegionGrid(middle=endpoint_region(lower, upper, total))
        low_edge, high_edge = self._dense_edges()
        has_low = float(lower.detach()) < float(low_edge.detach())
        has_high = float(upper.detach()) > float(high_edge.detach())
        if has_low and has_high:
            if self.levels == 'pwlq' and math.isnan(float(self.dense_share)):
                step = torch.clamp(2 * bp / (2 ** self.bits - 1), min=MIN_STEP)
                middle = Region(offset=torch.zeros_like(bp) + self.dense_center, step=step,
                                index_min=-2 ** (self.bits - 1), index_max=2 ** (self.bits - 1) - 1)
            else:
                middle = endpoint_region(low_edge, high_edge, dense)
                # The thresholds are the middle's end levels as computed, so that a quantized value on an
                # end level (off the edge by a rounding error) stays in the middle: Q(Q(x)) = Q(x).
                low_edge, high_edge = _end_levels(middle)
            return RegionGrid(middle=middle, low=endpoint_region(lower, low_edge, tail),
                              high=endpoint_region(high_edge, upper, tail), low_threshold=low_edge,
                              high_threshold=high_edge)
        if has_high:
            middle = endpoint_region(lower, high_edge, dense + tail)
            high_edge = _end_levels(middle)[1]
            return RegionGrid(middle=middle, high=endpoint_region(high_edge, upper, tail), high_threshold=high_edge)
        middle = endpoint_region(low_edge, upper, dense + tail)
        low_edge = _end_levels(middle)[0]
        return RegionGrid(middle=middle, low=endpoint_region(lower, low_edge, tail), low_threshold=low_edge)

    def describe(self) -> dict:
        info = super().describe()
        info.update(breakpoint=float(self.breakpoint.detach()), dense_center=float(self.dense_center),
                    levels=self.levels, degenerate=self.is_degenerate())
        return info

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, breakpoint={float(self.breakpoint.detach()):.4g}, levels={self.levels}'


def _end_levels(region: Region) -> tuple:
    """``(first, last)`` level of ``region``, computed as its quantizer computes levels."""
    return region.offset + region.index_min * region.step, region.offset + region.index_max * region.step
