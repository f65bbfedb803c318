"""Quantized wrappers for Conv2d, ConvTranspose2d and Linear: quantized input and weight, float bias.

A wrapper runs in one of three modes: ``observe`` (float op, its input fed to the activation
quantizer's statistics), ``quant`` (fake quantization, or an attached kernel backend) and ``float``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NumericalError
from .activation import ActivationQuantizer
from .observer import all_finite
from .weight import WeightQuantizer

MODES = ('observe', 'quant', 'float')


class QuantLayer(nn.Module):
    """Common behaviour of the quantized wrappers.

    Args:
        module: The float layer; its weight and bias are kept (frozen) and its op is reused.
        act_quantizer: Quantizer of the layer's input.
        weight_quantizer: Quantizer of the layer's weight (initialized by the shrink search here).
        name: The layer's name in the model, used in messages and reports.
        role: ``first``, ``last``, ``upsampler`` or ``body``.
    """

    weight_channel_axis = 0

    def __init__(self, module: nn.Module, act_quantizer: ActivationQuantizer, weight_quantizer: WeightQuantizer,
                 name: str = '', role: str = 'body') -> None:
        super().__init__()
        self.module = module
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        self.act_quantizer = act_quantizer
        self.weight_quantizer = weight_quantizer
        self.weight_quantizer.initialize(module.weight)
        self.layer_name = name
        self.role = role
        self.mode = 'quant'
        self.batch_index: Optional[int] = None
        # The one way to replace the layer's fake-quantized computation: a backend (reference integer
        # arithmetic or a Triton kernel), or for a while a training step's own (block reconstruction).
        self.executor: Optional[Callable[['QuantLayer', torch.Tensor], torch.Tensor]] = None
        self.executor_name = 'fake'

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.module.bias

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self.mode = mode

    def float_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == 'float':
            return self.float_op(x, self.weight)
        if self.mode == 'observe':
            if not all_finite(x):
                raise NumericalError(f"non-finite values (NaN/Inf) in the input of layer '{self.layer_name}' "
                                     'during calibration; check the input range and the checkpoint')
            self.act_quantizer.observe(x, self.batch_index)
            return self.float_op(x, self.weight)
        if self.executor is not None:
            return self.executor(self, x)
        return self.float_op(self.act_quantizer(x), self.quantized_weight())

    def extra_repr(self) -> str:
        return f"name='{self.layer_name}', role={self.role}, mode={self.mode}, backend={self.executor_name}"


class QuantConv2d(QuantLayer):
    """Quantized ``nn.Conv2d`` (any padding mode, stride, dilation, groups)."""

    def float_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.module._conv_forward(x, weight, self.module.bias)


class QuantConvTranspose2d(QuantLayer):
    """Quantized ``nn.ConvTranspose2d``; its output channels are the weight's axis 1."""

    weight_channel_axis = 1

    def float_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.conv_transpose2d(x, weight, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)


class QuantLinear(QuantLayer):
    """Quantized ``nn.Linear``."""

    def float_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.module.bias)


WRAPPERS = {nn.Conv2d: QuantConv2d, nn.ConvTranspose2d: QuantConvTranspose2d, nn.Linear: QuantLinear}


def wrapper_for(module: nn.Module) -> Optional[type]:
    """The wrapper class for a layer type (exact type match first, then subclasses)."""
    if type(module) in WRAPPERS:
        return WRAPPERS[type(module)]
    for base, wrapper in WRAPPERS.items():
        if isinstance(module, base):
            return wrapper
    return None


def quant_layers(model: nn.Module):
    """``(name, layer)`` for every quantized wrapper in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLayer)]
