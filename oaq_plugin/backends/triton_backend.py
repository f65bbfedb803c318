"""The Triton backend: runs quantized Conv2d and Linear layers through ``oaq_plugin.kernels``.

The layer's integer weight codes and its input grid are turned into the kernel's layout once and kept
until any parameter or buffer of the layer changes (finetuning, ``load_state_dict``, a device move).
"""
from __future__ import annotations

import itertools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from ..quant.layers import QuantLayer
from ..quant.region_grid import RegionGrid


def triton_available() -> Tuple[bool, str]:
    """``(available, why not)``: Triton imports and can run here (a CUDA device or the interpreter)."""
    try:
        from ..kernels.quant_conv2d import interpreting
    except ImportError as error:
        return False, f'triton cannot be imported ({error})'
    if torch.cuda.is_available() or interpreting():
        return True, ''
    return False, 'no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the slow CPU interpreter)'


def unsupported_reason(layer: QuantLayer) -> Optional[str]:
    """Why the Triton kernel cannot run ``layer``, or ``None`` when it can."""
    module = layer.module
    if isinstance(module, nn.ConvTranspose2d):
        return 'ConvTranspose2d has no Triton kernel'
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return f'{type(module).__name__} has no Triton kernel'
    if layer.weight_quantizer.bits > 8:
        return f'{layer.weight_quantizer.bits}-bit weights do not fit the kernel (at most 8 bits)'
    return None


def grid_params(grid: RegionGrid, device: torch.device):
    """The kernel's description of a region grid: per-region scalars, thresholds and the level table."""
    from ..kernels.quant_conv2d import GridParams

    def region(r, base: int):
        return (float(r.offset.detach()), float(r.step.detach()), float(r.index_min), float(r.index_max),
                float(base - r.index_min))

    low_levels = grid.low.num_levels if grid.low is not None else 0
    middle_base = low_levels
    high_base = middle_base + grid.middle.num_levels
    return GridParams(
        table=grid.level_table().to(device=device, dtype=torch.float32).contiguous(),
        middle=region(grid.middle, middle_base),
        low=region(grid.low, 0) if grid.low is not None else None,
        high=region(grid.high, high_base) if grid.high is not None else None,
        low_threshold=float(grid.low_threshold.detach()) if grid.low is not None else float('-inf'),
        high_threshold=float(grid.high_threshold.detach()) if grid.high is not None else float('inf'))


def _state_key(layer: QuantLayer) -> tuple:
    # A tensor's identity, storage and version change with every replacement, move or in-place update.
    return tuple((id(t), t.data_ptr(), t._version) for t in itertools.chain(layer.parameters(), layer.buffers()))


def _same_padding(module: nn.Conv2d) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of ``padding='same'`` (the extra pixel goes bottom/right)."""
    sizes = []
    for kernel, dilation in zip(module.kernel_size, module.dilation):
        total = dilation * (kernel - 1)
        sizes.append((total // 2, total - total // 2))
    return sizes[0] + sizes[1]


def conv_input(module: nn.Conv2d, x: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
    """``(x, padding)`` for a zero-padding kernel: a non-zero padding mode is applied to ``x`` here."""
    if module.padding_mode != 'zeros':
        # Quantization is elementwise, so padding by reflection/replication/wrapping commutes with it.
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
    if module.padding == 'same':
        return x, _same_padding(module)
    if module.padding == 'valid':
        return x, (0, 0)
    return x, module.padding


class CachedExecutor:
    """An executor keeping a layer's kernel operands (weight, grid) until any parameter or buffer changes.

    Subclasses set ``name`` and build the operands in ``_build``.
    """

    name = ''

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._weight = None
        self._grid = None

    def _build(self, layer: QuantLayer) -> tuple:
        raise NotImplementedError

    def prepare(self, layer: QuantLayer):
        """The layer's kernel weight and input grid (rebuilt only when the layer changed)."""
        key = _state_key(layer)
        if key != self._key:
            self._weight, self._grid = self._build(layer)
            self._key = key
        return self._weight, self._grid

    def _check_device(self, layer: QuantLayer, x: torch.Tensor) -> None:
        from ..kernels.quant_conv2d import interpreting
        if not (x.is_cuda or interpreting()):
            raise UnsupportedLayerError(f"layer '{layer.layer_name}': the {self.name} backend needs the input on a "
                                        f"CUDA device, got {x.device}; use to_backend(model, 'reference') on CPU")


class TritonExecutor(CachedExecutor):
    """A :class:`QuantLayer` executor running the Triton kernel.

    Args:
        precision: ``tl.dot`` input precision: ``ieee`` (exact fp32 products, the default),
            ``tf32x3`` (about fp32 accuracy on tensor cores) or ``tf32``.
        blocks: Optional ``(BLOCK_M, BLOCK_N, BLOCK_K)`` override.
    """

    name = 'triton'

    def __init__(self, precision: str = 'ieee', blocks: Optional[Tuple[int, int, int]] = None) -> None:
        super().__init__()
        self.precision = precision
        self.blocks = blocks

    def _build(self, layer: QuantLayer) -> tuple:
        """The layer's packed weight and grid parameters."""
        from ..kernels.quant_conv2d import pack_weight
        codes, step, zero_point = layer.weight_quantizer.integer_codes(layer.weight)
        module = layer.module
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        weight = pack_weight(codes, step, zero_point, module.bias, groups, layer.weight_quantizer.bits)
        return weight, grid_params(layer.act_quantizer.grid(), layer.weight.device)

    def __call__(self, layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.quant_conv2d import quant_linear
        self._check_device(layer, x)
        reason = unsupported_reason(layer)
        if reason is not None:
            raise UnsupportedLayerError(f"layer '{layer.layer_name}': {reason}")
        with torch.no_grad():
            weight, grid = self.prepare(layer)
            dtype = x.dtype
            x = x.to(torch.float32)
            module = layer.module
            if isinstance(module, nn.Linear):
                out = quant_linear(x, weight, grid, precision=self.precision, blocks=self.blocks)
            else:
                out = self._conv(module, x, weight, grid)
            return out.to(dtype)

    def _conv(self, module: nn.Conv2d, x: torch.Tensor, weight, grid) -> torch.Tensor:
        from ..kernels.quant_conv2d import quant_conv2d
        x, padding = conv_input(module, x)
        return quant_conv2d(x, weight, grid, stride=module.stride, padding=padding, dilation=module.dilation,
                            precision=self.precision, blocks=self.blocks)
