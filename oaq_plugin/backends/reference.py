"""The reference backend: plain PyTorch integer arithmetic that defines what a quantized layer computes.

The input is mapped to its integer codes on the activation quantizer's region grid and decoded through
the grid's level table; the weight is decoded from its unsigned integer codes as
``(code - zero_point) * step``; the float op (conv, transposed conv, linear) then runs on the decoded
values with the float bias. Every kernel backend is tested against this definition.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from ..quant.layers import QuantLayer
from ..quant.region_grid import RegionGrid


def decode_input(grid: RegionGrid, x: torch.Tensor) -> torch.Tensor:
    """``level_table()[encode(x)]``: the quantized input, through integer codes."""
    codes = grid.encode(x)
    table = grid.level_table().to(device=x.device)
    return table[codes].to(x.dtype)


def weight_codes(layer: QuantLayer) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``(codes uint8, step, zero_point)`` of the layer's weight."""
    return layer.weight_quantizer.integer_codes(layer.weight)


def decode_weight(layer: QuantLayer) -> torch.Tensor:
    """The quantized weight, ``(code - zero_point) * step``, in the weight's dtype."""
    codes, step, zero_point = weight_codes(layer)
    return ((codes.to(torch.float32) - zero_point) * step.to(torch.float32)).to(layer.weight.dtype)


def reference_forward(layer: QuantLayer, x: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's quantized output, computed in ``compute_dtype`` (float64 for an exact check).

    Args:
        layer: A quantized Conv2d, ConvTranspose2d or Linear wrapper.
        x: Its input.
        compute_dtype: Dtype of the decoded operands and of the float op; the result has ``x``'s dtype.
    """
    grid = layer.act_quantizer.grid()
    xq = decode_input(grid, x).to(compute_dtype)
    wq = decode_weight(layer).to(compute_dtype)
    module = layer.module
    bias = None if module.bias is None else module.bias.detach().to(compute_dtype)
    if isinstance(module, nn.Conv2d):
        out = module._conv_forward(xq, wq, bias)
    elif isinstance(module, nn.ConvTranspose2d):
        out = F.conv_transpose2d(xq, wq, bias, module.stride, module.padding, module.output_padding,
                                 module.groups, module.dilation)
    elif isinstance(module, nn.Linear):
        out = F.linear(xq, wq, bias)
    else:
        raise UnsupportedLayerError(f"layer '{layer.layer_name}' wraps {type(module).__name__}; the reference "
                                    'backend runs Conv2d, ConvTranspose2d and Linear')
    return out.to(x.dtype)


class ReferenceExecutor:
    """A :class:`QuantLayer` executor running :func:`reference_forward`.

    Args:
        compute_dtype: Dtype of the float op. By default float32 on CPU and float64 on CUDA, where cuDNN
            would otherwise be free to run fp32 convolutions in TF32 (about 3 significant digits).
    """

    name = 'reference'

    def __init__(self, compute_dtype: Optional[torch.dtype] = None) -> None:
        self.compute_dtype = compute_dtype

    def __call__(self, layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or (torch.float64 if x.is_cuda else torch.float32)
        with torch.no_grad():
            return reference_forward(layer, x, dtype)
