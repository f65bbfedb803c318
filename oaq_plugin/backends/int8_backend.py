"""The int8 Triton backend: layers whose input grid is an integer lattice run as int8 x int8 -> int32.

A region grid is a lattice when every level is ``unit * n`` with an integer ``n`` and the integers span at
most 256 values (stored in int8 as ``n - zero``). Such a layer quantizes its float input to int8 codes, runs
``oaq_plugin.kernels.int8_conv2d`` and returns fp32; its output equals the reference backend's up to float
rounding. The packed weights and the lattice are kept until any parameter or buffer of the layer changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import UnsupportedLayerError
from ..quant.layers import QuantLayer
from ..quant.observer import all_finite
from ..quant.region_grid import RegionGrid
from .triton_backend import CachedExecutor, conv_input, grid_params

# Levels may sit off the exact lattice by float32 rounding of ``offset + i * step``: a few ulps of the
# largest level. Anything farther is not a lattice (the int8 result would differ from the reference).
LATTICE_TOLERANCE = 1e-6
INT8_SPAN = 255


@dataclass
class Lattice:
    """``levels = unit * integers``; codes are stored as ``integers - zero`` in int8."""

    unit: float
    zero: int
    integers: torch.Tensor


def integer_lattice(grid: RegionGrid) -> Tuple[Optional[Lattice], str]:
    """``(lattice, '')`` when every level of ``grid`` is an integer multiple of one unit within an int8 span,
    else ``(None, why not)``.

    A grid snapped by the integer-lattice option carries its lattice, which is taken as it is (an int16 one
    is refused). Otherwise the levels decide, and the unit is the coarsest one: the smallest region step
    divided by the smallest integer ``d`` that puts every level on the lattice (to ``LATTICE_TOLERANCE`` of
    the largest level); it is then refitted by least squares so that ``unit * n`` is as close to the float
    levels as float64 allows.
    """
    levels = grid.level_table().detach().to(device='cpu', dtype=torch.float64)
    declared = _declared_lattice(grid, levels)
    if declared is not None:
        return declared
    if not levels.numel() or not all_finite(levels):
        return None, 'its levels are not finite'
    magnitude = float(levels.abs().max())
    if not magnitude:
        return Lattice(unit=1.0, zero=0, integers=torch.zeros(levels.numel(), dtype=torch.int32)), ''
    steps = [float(r.step.detach()) for r in grid.regions() if r.num_levels > 1]
    base = min(steps) if steps else float(levels.abs()[levels != 0].min())
    tolerance = LATTICE_TOLERANCE * magnitude
    for divisor in range(1, INT8_SPAN + 2):
        unit = base / divisor
        integers = torch.round(levels / unit)
        if float(integers.max() - integers.min()) > INT8_SPAN:
            break
        if float((levels - integers * unit).abs().max()) > tolerance:
            continue
        unit = float((integers * levels).sum() / (integers * integers).sum())
        if float((levels - integers * unit).abs().max()) > tolerance:
            continue
        low, high = int(integers.min()), int(integers.max())
        # The zero closest to 0 that keeps every integer - zero inside [-128, 127].
        zero = min(max(0, high - 127), low + 128)
        return Lattice(unit=unit, zero=zero, integers=integers.to(torch.int32)), ''
    return None, ('its levels are not integer multiples of one unit within an int8 span '
                  f'(largest level {magnitude:.4g}, smallest step {base:.4g})')


def _declared_lattice(grid: RegionGrid, levels: torch.Tensor) -> Optional[Tuple[Optional[Lattice], str]]:
    """The lattice a grid carries (``oaq.integer_lattice``: ``grid.lattice``), in this module's convention, or
    ``None`` when it carries none (then the levels are examined)."""
    declared = getattr(grid, 'lattice', None)
    if declared is None:
        return None
    from ..quant.integer_lattice import lattice_codes
    if declared.bits != 8:
        return None, f'its lattice stores {declared.bits}-bit codes (int8 holds at most 256 levels)'
    integers = lattice_codes(grid)
    unit = float(declared.unit)
    # Its stored code is n + zero_point; here a code is n - zero.
    zero = -int(declared.zero_point)
    stored = integers - zero
    if int(stored.min()) < -128 or int(stored.max()) > 127 or \
            float((levels - integers.double() * unit).abs().max()) > LATTICE_TOLERANCE * float(levels.abs().max()):
        return None
    return Lattice(unit=unit, zero=zero, integers=integers.to(torch.int32)), ''


def int8_unsupported_reason(layer: QuantLayer) -> Optional[str]:
    """Why the int8 kernel cannot run ``layer``, or ``None`` when it can."""
    module = layer.module
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return f'{type(module).__name__} has no int8 kernel'
    bits = layer.weight_quantizer.bits
    if bits > 8:
        return f'{bits}-bit weights do not fit int8'
    lattice, why = integer_lattice(layer.act_quantizer.grid())
    if lattice is None:
        return f'its input grid is not an int8 lattice: {why}'
    reduction = module.weight[0].numel()
    largest = max(abs(-128 + lattice.zero), abs(127 + lattice.zero)) * 2 ** bits
    if reduction * largest > 2 ** 31 - 1:
        return f'{reduction} products per output could overflow the int32 accumulator'
    return None


def lattice_params(grid: RegionGrid, lattice: Lattice, device: torch.device):
    """The kernel's description of a lattice grid (regions as in ``grid_params``, plus the integers)."""
    from ..kernels.int8_conv2d import LatticeGrid
    params = grid_params(grid, device)
    return LatticeGrid(unit=lattice.unit, zero=lattice.zero, integers=lattice.integers.to(device).contiguous(),
                       middle=params.middle, low=params.low, high=params.high,
                       low_threshold=params.low_threshold, high_threshold=params.high_threshold)


class Int8Executor(CachedExecutor):
    """A :class:`QuantLayer` executor running the int8 lattice kernel.

    Args:
        blocks: Optional ``(BLOCK_M, BLOCK_N, BLOCK_K)`` override.
        num_warps, num_stages: Launch settings.
    """

    name = 'triton_int8'

    def __init__(self, blocks: Optional[Tuple[int, int, int]] = None, num_warps: int = 4,
                 num_stages: int = 3) -> None:
        super().__init__()
        self.blocks = blocks
        self.num_warps = num_warps
        self.num_stages = num_stages

    def _build(self, layer: QuantLayer) -> tuple:
        """The layer's packed weight and input lattice."""
        from ..kernels.int8_conv2d import pack_int8_weight
        reason = int8_unsupported_reason(layer)
        if reason is not None:
            raise UnsupportedLayerError(f"layer '{layer.layer_name}': {reason}; use backend 'triton' or "
                                        "'reference' for it")
        grid = layer.act_quantizer.grid()
        lattice, _ = integer_lattice(grid)
        codes, step, zero_point = layer.weight_quantizer.integer_codes(layer.weight)
        module = layer.module
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        weight = pack_int8_weight(codes, step, zero_point, module.bias, groups, layer.weight_quantizer.bits)
        return weight, lattice_params(grid, lattice, layer.weight.device)

    def __call__(self, layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.int8_conv2d import int8_conv2d, int8_linear, lattice_quantize
        self._check_device(layer, x)
        with torch.no_grad():
            weight, grid = self.prepare(layer)
            dtype = x.dtype
            module = layer.module
            launch = dict(blocks=self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)
            if isinstance(module, nn.Linear):
                codes = lattice_quantize(x.to(torch.float32).contiguous(), grid)
                return int8_linear(codes, weight, grid, **launch).to(dtype)
            x, padding = conv_input(module, x.to(torch.float32))
            codes = lattice_quantize(x, grid)
            out = int8_conv2d(codes, weight, grid, stride=module.stride, padding=padding, dilation=module.dilation,
                              **launch)
            # NHWC memory seen as an NCHW tensor: channels-last strides, no copy.
            return out.permute(0, 3, 1, 2).to(dtype)
