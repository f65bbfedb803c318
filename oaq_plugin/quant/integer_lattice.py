"""Activation grids on an integer lattice: every level is ``u * n`` with one unit ``u`` and an integer ``n``
whose code ``n + zero_point`` fits int8 (int16, rarely int32, where it cannot), so an integer engine runs it.

A region grid is up to three affine regions. :func:`to_lattice` snaps it: the unit is the middle region's
step divided by an integer ``d``, every region's offset and step become integer multiples of the unit (a
tail keeps the level it shares with the middle region), and ``d`` is chosen, among those whose codes fit,
as the one that moves the levels least. The snapping is straight-through (its gradient is the
identity), so calibration, search, rounding, reconstruction and finetuning train the lattice grid
through the gradients of the float grid it comes from.

A grid int8 cannot hold (an 8-bit dual-region grid: 256 levels plus the gaps of its tails) goes on an int16
lattice rather than being split into a dense int8 plane and a sparse tail plane: the split would run each
layer's product twice (one int8 product per plane; engines have no sparse convolution), about what the
one float product on the decoded codes costs on CPUs whose int8 convolutions are ~2x faster than fp32, and
it would give up the one code per value that the reference, the kernels and the ONNX export share.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .region_grid import Region, RegionGrid

# Code ranges of the storage widths: (bits, lowest code, highest code). The 32-bit lattice is limited to
# +-2^24, where float32 still holds every u * n exactly; it takes the rare grids whose tails reach beyond
# 2^16 units of the middle step (an 8-bit grid with tails hundreds of breakpoints long).
STORAGES = ((8, -128, 127), (16, -32768, 32767), (32, -2 ** 24, 2 ** 24))
# Largest unit divisor tried: finer units move levels less but need more codes.
MAX_DIVISOR = 64
# Relative distance under which two levels of the float grid count as the same level.
SAME_LEVEL_TOLERANCE = 1e-5


@dataclass
class Lattice:
    """The integer lattice of a grid: level ``u * n``, code ``q = n + zero_point`` in ``[code_min, code_max]``.

    Attributes:
        unit: ``u``, a 0-d tensor.
        zero_point: Added to ``n`` to make the stored code.
        bits: Storage width of the codes: 8, 16 or 32 (see ``STORAGES``).
        n_min: Smallest ``n`` of a level.
        n_max: Largest ``n`` of a level.
    """

    unit: torch.Tensor
    zero_point: int
    bits: int
    n_min: int
    n_max: int

    @property
    def code_range(self) -> Tuple[int, int]:
        """``(lowest, highest)`` code of the storage width."""
        for bits, low, high in STORAGES:
            if bits == self.bits:
                return low, high
        raise ValueError(f'no storage of {self.bits} bits')

    def describe(self) -> dict:
        return {'unit': float(self.unit.detach()), 'zero_point': self.zero_point, 'bits': self.bits,
                'n_min': self.n_min, 'n_max': self.n_max}


@dataclass
class LatticeRegion(Region):
    """A region whose levels are ``unit * (n_offset + i * n_step)`` exactly.

    ``offset`` and ``step`` hold the values ``unit * n_offset`` and ``unit * n_step`` and the gradients of
    the float region they were snapped from: the index is chosen with :class:`Region`'s arithmetic (so
    every backend picks the same codes), the level is the exact lattice value (so a quantized value is a
    fixed point and decodes as ``unit * n``), and training sees the snapping as the identity.
    """

    unit: Optional[torch.Tensor] = None
    n_offset: int = 0
    n_step: int = 1

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        index = _round_ste(torch.clamp((x - self.offset) / self.step, self.index_min, self.index_max))
        value = self.offset + index * self.step
        exact = self.unit * (self.n_offset + index.detach() * self.n_step)
        return exact + (value - value.detach())

    def lattice_levels(self) -> List[int]:
        """The ``n`` of every level, in index order."""
        return [self.n_offset + i * self.n_step for i in range(self.index_min, self.index_max + 1)]

    def levels(self) -> torch.Tensor:
        n = torch.tensor(self.lattice_levels(), dtype=torch.float32, device=self.unit.device)
        return self.unit.float() * n


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _snapped(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``target`` whose gradient is that of ``value`` (straight-through snapping)."""
    return target.detach() + (value - value.detach())


@dataclass
class _Plan:
    """Integer structure of a lattice grid for one unit divisor (plain numbers)."""

    divisor: int
    unit: float
    regions: List[Tuple[int, int]]        # (n_offset, n_step) per region, in code order
    low_threshold: Optional[int]
    high_threshold: Optional[int]
    n_min: int
    n_max: int
    displacement: float
    # Every region's levels moved by at most half of that region's step.
    faithful: bool


def _float(t: Optional[torch.Tensor]) -> Optional[float]:
    return None if t is None else float(t.detach())


def _near(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= SAME_LEVEL_TOLERANCE * max(scale, 1e-30)


# A grid as plain numbers: ((offset, step, index_min, index_max) per region in code order, index of the
# middle region, low threshold, high threshold); the key of the plan cache.
_Layout = Tuple[Tuple[Tuple[float, float, int, int], ...], int, Optional[float], Optional[float]]


def _layout(grid: RegionGrid) -> _Layout:
    regions = grid.regions()
    return (tuple((float(r.offset.detach()), float(r.step.detach()), r.index_min, r.index_max) for r in regions),
            regions.index(grid.middle), _float(grid.low_threshold) if grid.low is not None else None,
            _float(grid.high_threshold) if grid.high is not None else None)


def _plan(layout: _Layout, divisor: int) -> Optional[_Plan]:
    regions, middle_at, low_threshold_value, high_threshold_value = layout
    mid_offset_value, step, mid_min, mid_max = regions[middle_at]
    unit = step / divisor
    if not (math.isfinite(unit) and unit > 0):
        return None
    scale = max([step] + [abs(o + i * s) for o, s, low, high in regions for i in (low, high)])
    mid_offset = round(mid_offset_value / unit)
    mid_ends = (mid_offset + mid_min * divisor, mid_offset + mid_max * divisor)
    mid_end_values = (mid_offset_value + mid_min * step, mid_offset_value + mid_max * step)
    structure: List[Tuple[int, int]] = []
    inner: Dict[int, Tuple[float, int]] = {}
    for position, (offset, region_step, index_min, index_max) in enumerate(regions):
        if position == middle_at:
            structure.append((mid_offset, divisor))
            continue
        n_step = max(1, round(region_step / unit))
        is_low = position < middle_at
        if index_min == index_max:
            structure.append((round(offset / unit), n_step))
            inner[position] = (offset + index_min * region_step, structure[-1][0] + index_min * n_step)
            continue
        # A tail is anchored at its level nearest the middle region, which it shares with the middle region
        # under the paper allocation: that level stays where the middle region puts it.
        inner_index = index_max if is_low else index_min
        inner_value = offset + inner_index * region_step
        shared_value, shared = (mid_end_values[0], mid_ends[0]) if is_low else (mid_end_values[1], mid_ends[1])
        n_inner = shared if _near(inner_value, shared_value, scale) else round(inner_value / unit)
        structure.append((n_inner - inner_index * n_step, n_step))
        inner[position] = (inner_value, n_inner)

    def threshold(value: Optional[float], position: int, is_low: bool) -> Optional[int]:
        if value is None:
            return None
        candidates = [(mid_end_values[0], mid_ends[0]) if is_low else (mid_end_values[1], mid_ends[1]),
                      inner[position]]
        for candidate_value, candidate in candidates:
            if _near(value, candidate_value, scale):
                return candidate
        return round(value / unit)

    low_threshold = threshold(low_threshold_value, 0, True)
    high_threshold = threshold(high_threshold_value, len(regions) - 1, False)
    ends: List[int] = []
    float_ends: List[float] = []
    displacement = 0.0
    faithful = True
    for (offset, region_step, index_min, index_max), (n_offset, n_step) in zip(regions, structure):
        # Levels are affine in the index: the largest move is at one of the region's ends.
        moved = 0.0
        for i in (index_min, index_max):
            n = n_offset + i * n_step
            ends.append(n)
            float_ends.append(offset + i * region_step)
            moved = max(moved, abs(n * unit - float_ends[-1]))
        displacement = max(displacement, moved)
        if index_max > index_min and moved > 0.5 * region_step * (1 + SAME_LEVEL_TOLERANCE):
            faithful = False
    # Snapping must keep the order of the region ends (a monotone grid stays monotone).
    if any(b < a and fb >= fa for a, b, fa, fb in zip(ends[:-1], ends[1:], float_ends[:-1], float_ends[1:])):
        return None
    return _Plan(divisor=divisor, unit=unit, regions=structure, low_threshold=low_threshold,
                 high_threshold=high_threshold, n_min=min(ends), n_max=max(ends), displacement=displacement,
                 faithful=faithful)


def _fits(plan: _Plan, low: int, high: int) -> Optional[int]:
    """The zero point that puts ``[n_min, n_max]`` inside ``[low, high]`` (0 when it already is), or ``None``."""
    if plan.n_max - plan.n_min > high - low:
        return None
    if low <= plan.n_min and plan.n_max <= high:
        return 0
    zero_point = low - plan.n_min
    return zero_point if low <= zero_point <= high else None


@functools.lru_cache(maxsize=4096)
def _divisors(layout: _Layout) -> List[int]:
    """Unit divisors to try, ascending: 1..MAX_DIVISOR, and the one a region finer than the middle needs.

    A region of ``T`` levels and step ``t`` stays faithful (each level moves by at most ``t / 2``) once
    the unit is at most ``t / T``: its anchor and each of its steps move by at most half a unit.
    """
    regions, middle_at, _, _ = layout
    step = regions[middle_at][1]
    needed = 1
    for position, (_, region_step, index_min, index_max) in enumerate(regions):
        if position != middle_at and index_max > index_min and region_step > 0:
            needed = max(needed, math.ceil((index_max - index_min + 1) * step / region_step))
    extra = [needed, needed + 1] if needed > MAX_DIVISOR and math.isfinite(needed) else []
    return list(range(1, MAX_DIVISOR + 1)) + extra


@functools.lru_cache(maxsize=4096)
def _choose(layout: _Layout) -> Tuple[_Plan, int, int]:
    fallback = None
    for bits, low, high in STORAGES:
        best = None
        for divisor in _divisors(layout):
            plan = _plan(layout, divisor)
            if plan is None:
                continue
            if plan.n_max - plan.n_min > high - low:
                # Larger divisors only need more codes.
                break
            zero_point = _fits(plan, low, high)
            if zero_point is None:
                continue
            if fallback is None or plan.displacement < fallback[0].displacement:
                fallback = (plan, bits, zero_point)
            if plan.faithful and (best is None or plan.displacement < best[0].displacement):
                best = (plan, zero_point)
        # The narrowest storage in which no region moves by more than half its step; a wider one otherwise.
        if best is not None:
            return best[0], bits, best[1]
    if fallback is not None:
        return fallback
    raise ValueError(f'no integer lattice holds this grid: {layout}')


def choose_plan(grid: RegionGrid) -> Tuple[_Plan, int, int]:
    """``(plan, storage bits, zero point)``: the least-moving divisor in the narrowest storage where every
    region's levels move by at most half of its step (the least-moving plan of any storage if none does).

    The choice depends on the grid's numbers only and is cached, since every forward asks for it again.
    """
    return _choose(_layout(grid))


def to_lattice(grid: RegionGrid) -> RegionGrid:
    """``grid`` with every level on an integer lattice (see the module docstring).

    The level count, region layout and region choice are kept; offsets, steps and thresholds move by
    less than the unit times the level count of a region. Gradients flow straight through the snapping.
    A grid no lattice holds (non-finite parameters, a collapsed middle region, or tails over 2^24 units) is
    returned unchanged, with ``lattice`` left ``None``.
    """
    try:
        plan, bits, zero_point = choose_plan(grid)
    except ValueError:
        # Non-finite parameters, or tails over 2^24 units of the middle step: left as they are (such a
        # layer runs its product in floating point everywhere).
        return grid
    unit = (grid.middle.step / plan.divisor).detach()

    def snapped(region: Region, n_offset: int, n_step: int) -> LatticeRegion:
        return LatticeRegion(offset=_snapped(region.offset, unit * n_offset), step=_snapped(region.step, unit * n_step),
                             index_min=region.index_min, index_max=region.index_max, unit=unit, n_offset=n_offset,
                             n_step=n_step)

    regions = {id(r): snapped(r, *structure) for r, structure in zip(grid.regions(), plan.regions)}

    def threshold(value: Optional[torch.Tensor], n: Optional[int]) -> Optional[torch.Tensor]:
        return None if value is None else _snapped(value, unit * n)

    lattice = Lattice(unit=unit, zero_point=zero_point, bits=bits, n_min=plan.n_min, n_max=plan.n_max)
    return RegionGrid(middle=regions[id(grid.middle)],
                      low=regions[id(grid.low)] if grid.low is not None else None,
                      high=regions[id(grid.high)] if grid.high is not None else None,
                      low_threshold=threshold(grid.low_threshold, plan.low_threshold),
                      high_threshold=threshold(grid.high_threshold, plan.high_threshold),
                      lattice=lattice)


def lattice_codes(grid: RegionGrid) -> torch.Tensor:
    """The integer ``n`` of every code of a lattice grid, in code order (int64)."""
    if grid.lattice is None:
        raise ValueError('this grid is not on an integer lattice')
    return torch.tensor([n for region in grid.regions() for n in region.lattice_levels()], dtype=torch.int64)


@dataclass
class WeightLattice:
    """A quantized weight as integers: ``weight_q = n * scale`` (``scale`` per output channel).

    Attributes:
        n: Integer weight values (int16 tensor of the weight's shape).
        scale: Float scale of each clip group, shaped to broadcast against the weight.
        bits: 8 when every ``n`` fits int8, else 16.
    """

    n: torch.Tensor
    scale: torch.Tensor
    bits: int


def weight_lattice(codes: torch.Tensor, step: torch.Tensor, zero_point: float) -> WeightLattice:
    """Integer weights for codes decoded as ``(code - zero_point) * step``.

    An integer zero point (the ``zero`` grid) gives ``n = code - zero_point`` on ``step``; the paper grid's
    half-integer zero point gives the odd integers ``n = 2 * code - 2 * zero_point`` on ``step / 2``, which
    fit int8 up to 7-bit codes (8-bit paper codes need int16, or an engine's own correction term).
    """
    codes = codes.to(torch.int32)
    doubled = round(2 * zero_point)
    if doubled % 2 == 0:
        n, scale = codes - doubled // 2, step
    else:
        n, scale = 2 * codes - doubled, step / 2
    bits = 8 if int(n.min()) >= -128 and int(n.max()) <= 127 else 16
    return WeightLattice(n=n.to(torch.int16), scale=scale.float(), bits=bits)
