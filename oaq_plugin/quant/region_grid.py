"""Piecewise-uniform quantization grids: up to three affine regions chosen by two thresholds.

Every activation quantizer of the project (dual-region, one-sided, uniform fallback, the uniform
baselines) is one of these grids, so the fake-quant layers, the reference arithmetic and the Triton
kernels share one description: a value picks the low region below ``low_threshold``, the high region
above ``high_threshold`` and the middle region otherwise, then rounds to that region's affine grid
``offset + i * step`` with ``i`` clamped to ``[index_min, index_max]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch

from .rounding import round_ste

if TYPE_CHECKING:
    from .integer_lattice import Lattice

# Smallest step a grid may have: keeps constant tensors and collapsed ranges finite (no 0/0).
MIN_STEP = 1e-8


@dataclass
class Region:
    """One affine grid ``offset + i * step``, ``i`` in ``[index_min, index_max]``.

    ``offset`` and ``step`` are 0-d tensors that may carry gradients to the quantizer parameters.
    """

    offset: torch.Tensor
    step: torch.Tensor
    index_min: int
    index_max: int

    @property
    def num_levels(self) -> int:
        return self.index_max - self.index_min + 1

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        # Clamp before rounding (LSQ): the same values as clamping the rounded index, but a value that
        # rounds onto the first or last level keeps its straight-through gradient; clamping after
        # rounding lost it wherever round_ste landed on a bound, i.e. on every region's end levels.
        index = round_ste(torch.clamp((x - self.offset) / self.step, self.index_min, self.index_max))
        return self.offset + index * self.step

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Integer grid index of each value (no gradient)."""
        with torch.no_grad():
            return torch.clamp(torch.round((x - self.offset) / self.step), self.index_min, self.index_max).long()

    def levels(self) -> torch.Tensor:
        indices = torch.arange(self.index_min, self.index_max + 1, dtype=torch.float32,
                               device=self.offset.device)
        return self.offset.detach() + indices * self.step.detach()


def endpoint_region(low: torch.Tensor, high: torch.Tensor, num_levels: int) -> Region:
    """``num_levels`` points on ``[low, high]``, both endpoints included; one level sits at the middle."""
    if num_levels == 1:
        return Region(offset=(low + high) / 2, step=torch.clamp((high - low).abs(), min=MIN_STEP), index_min=0,
                      index_max=0)
    step = torch.clamp((high - low) / (num_levels - 1), min=MIN_STEP)
    return Region(offset=low, step=step, index_min=0, index_max=num_levels - 1)


@dataclass
class RegionGrid:
    """A middle region plus optional low/high regions selected by ``x < low_threshold``/``x > high_threshold``."""

    middle: Region
    low: Optional[Region] = None
    high: Optional[Region] = None
    low_threshold: Optional[torch.Tensor] = None
    high_threshold: Optional[torch.Tensor] = None
    # Set when every level is ``unit * n`` with an integer code (quant/integer_lattice.py).
    lattice: Optional['Lattice'] = None

    def regions(self) -> List[Region]:
        """Regions in code order: low, middle, high (absent ones skipped)."""
        return [r for r in (self.low, self.middle, self.high) if r is not None]

    @property
    def num_codes(self) -> int:
        return sum(r.num_levels for r in self.regions())

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (straight-through rounding; gradients reach offsets, steps and thresholds)."""
        out = self.middle.quantize(x)
        if self.low is not None:
            out = torch.where(x < self.low_threshold.detach(), self.low.quantize(x), out)
        if self.high is not None:
            out = torch.where(x > self.high_threshold.detach(), self.high.quantize(x), out)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The integer code of each value: its region's base plus its index inside the region."""
        with torch.no_grad():
            base = 0 if self.low is None else self.low.num_levels
            codes = self.middle.index(x) - self.middle.index_min + base
            if self.low is not None:
                codes = torch.where(x < self.low_threshold, self.low.index(x) - self.low.index_min, codes)
            if self.high is not None:
                high_base = base + self.middle.num_levels
                codes = torch.where(x > self.high_threshold, self.high.index(x) - self.high.index_min + high_base,
                                    codes)
            return codes

    def level_table(self) -> torch.Tensor:
        """Value of every code, in code order (``decode(code) = level_table()[code]``)."""
        return torch.cat([r.levels() for r in self.regions()])

    def describe(self) -> dict:
        """Plain numbers for reports and kernels."""
        def region(r: Optional[Region]) -> Optional[dict]:
            if r is None:
                return None
            return {'offset': float(r.offset.detach()), 'step': float(r.step.detach()), 'index_min': r.index_min,
                    'index_max': r.index_max}
        info = {
            'low': region(self.low), 'middle': region(self.middle), 'high': region(self.high),
            'low_threshold': None if self.low_threshold is None else float(self.low_threshold.detach()),
            'high_threshold': None if self.high_threshold is None else float(self.high_threshold.detach()),
        }
        if self.lattice is not None:
            info['lattice'] = self.lattice.describe()
        return info
