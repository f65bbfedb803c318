"""Activation quantizers on the two matmuls of window attention (q·kᵀ and attn·v), for SwinIR-style blocks.

Window-attention modules are recognised by their structure, not by importing their architecture: a
``qkv`` and a ``proj`` layer, ``num_heads``, ``scale``, ``window_size``, a relative-position bias table
with its index, and ``forward(x, mask)``. The matmuls run as fake quantization on every backend: the
integer reference and the Triton kernels replace only Conv2d/ConvTranspose2d/Linear layers.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..errors import NumericalError
from .activation import ActivationQuantizer
from .layers import MODES

# What a module must have to be run by QuantWindowAttention (BasicSR's and the original SwinIR's layout).
WINDOW_ATTENTION_ATTRIBUTES = ('qkv', 'proj', 'num_heads', 'scale', 'window_size', 'relative_position_bias_table',
                               'relative_position_index')


class QuantMatmul(nn.Module):
    """``left @ right`` with an activation quantizer on each operand.

    Runs in the modes of :class:`~oaq_plugin.quant.layers.QuantLayer`: ``observe`` (float matmul, both
    operands fed to their quantizers' statistics), ``quant`` (fake-quantized operands) and ``float``.

    Args:
        left: ``(operand name, quantizer)`` of the left operand; the quantizer is registered under that name.
        right: ``(operand name, quantizer)`` of the right operand.
        name: The matmul's name in the model, used in messages and reports.
    """

    executor_name = 'fake'

    def __init__(self, left: Tuple[str, ActivationQuantizer], right: Tuple[str, ActivationQuantizer],
                 name: str = '') -> None:
        super().__init__()
        self.operands = (left[0], right[0])
        self.add_module(left[0], left[1])
        self.add_module(right[0], right[1])
        self.layer_name = name
        self.role = 'body'
        self.mode = 'quant'
        self.batch_index: Optional[int] = None

    def quantizers(self) -> List[Tuple[str, ActivationQuantizer]]:
        """``(operand name, quantizer)`` of the left and the right operand."""
        return [(operand, getattr(self, operand)) for operand in self.operands]

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self.mode = mode

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        if self.mode == 'observe':
            for (operand, quantizer), value in zip(self.quantizers(), (left, right)):
                if not torch.isfinite(value).all():
                    raise NumericalError(f"non-finite values (NaN/Inf) in operand '{operand}' of matmul "
                                         f"'{self.layer_name}' during calibration; check the input range and "
                                         'the checkpoint')
                quantizer.observe(value, self.batch_index)
        elif self.mode == 'quant':
            left_quantizer, right_quantizer = (quantizer for _, quantizer in self.quantizers())
            left, right = left_quantizer(left), right_quantizer(right)
        return left @ right

    def extra_repr(self) -> str:
        return f"name='{self.layer_name}', operands={self.operands}, mode={self.mode}, backend={self.executor_name}"


def is_window_attention(module: nn.Module) -> bool:
    """Whether ``module`` has the structure :class:`QuantWindowAttention` runs (see the module docstring)."""
    if isinstance(module, QuantWindowAttention):
        return False
    if not all(hasattr(module, attribute) for attribute in WINDOW_ATTENTION_ATTRIBUTES):
        return False
    if not isinstance(module.qkv, nn.Module) or not isinstance(module.proj, nn.Module):
        return False
    try:
        parameters = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    # HAT-style attention passes the position index as an argument: a different forward, not matched.
    return parameters == ['x', 'mask']


class QuantWindowAttention(nn.Module):
    """A window-attention module whose q·kᵀ and attn·v matmuls quantize their operands.

    It takes over the float module's layers, parameters and buffers under the same names (so
    ``attn.qkv``, ``attn.proj`` and the bias table keep their names and state-dict keys) and adds
    ``matmul_qk`` (operands ``q``, the scaled queries, and ``k``, the transposed keys) and ``matmul_av``
    (operands ``attn``, the softmax output in [0, 1], and ``v``). With both matmuls in ``float`` mode the
    output equals the float module's exactly.

    Args:
        module: The float window-attention module (see :func:`is_window_attention`).
        make_quantizer: Returns a new activation quantizer; called once per operand.
        name: The module's name in the model.
    """

    def __init__(self, module: nn.Module, make_quantizer: Callable[[], ActivationQuantizer], name: str = '') -> None:
        super().__init__()
        for child_name, child in module.named_children():
            self.add_module(child_name, child)
        for parameter_name, parameter in module.named_parameters(recurse=False):
            self.register_parameter(parameter_name, parameter)
        for buffer_name, buffer in module.named_buffers(recurse=False):
            self.register_buffer(buffer_name, buffer,
                                 persistent=buffer_name not in module._non_persistent_buffers_set)
        self.dim = getattr(module, 'dim', None)
        self.num_heads = int(module.num_heads)
        self.scale = module.scale
        self.window_size = tuple(module.window_size)
        self.float_class = type(module).__name__
        self.layer_name = name
        self.matmul_qk = QuantMatmul(('q', make_quantizer()), ('k', make_quantizer()), name=f'{name}.matmul_qk')
        self.matmul_av = QuantMatmul(('attn', make_quantizer()), ('v', make_quantizer()), name=f'{name}.matmul_av')

    def _position_bias(self) -> torch.Tensor:
        """The relative-position bias, (heads, tokens, tokens)."""
        tokens = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(tokens, tokens, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: x (windows*batch, tokens, channels); mask (windows, tokens, tokens) of 0/-100, or None."""
        windows_batch, tokens, channels = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(windows_batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        scores = scores + self._position_bias().unsqueeze(0)
        if mask is not None:
            # The shifted-window mask repeats over the batch: one (tokens x tokens) mask per window position.
            windows = mask.shape[0]
            scores = scores.view(windows_batch // windows, windows, heads, tokens, tokens)
            scores = (scores + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, tokens, tokens)
        softmax = getattr(self, 'softmax', None)
        attn = softmax(scores) if softmax is not None else torch.softmax(scores, dim=-1)
        attn_drop = getattr(self, 'attn_drop', None)
        if attn_drop is not None:
            attn = attn_drop(attn)
        out = self.matmul_av(attn, v).transpose(1, 2).reshape(windows_batch, tokens, channels)
        out = self.proj(out)
        proj_drop = getattr(self, 'proj_drop', None)
        return proj_drop(out) if proj_drop is not None else out

    def extra_repr(self) -> str:
        return f"name='{self.layer_name}', float_class={self.float_class}, num_heads={self.num_heads}"


def window_attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every float window-attention module of ``model``."""
    return [(name, module) for name, module in model.named_modules() if name and is_window_attention(module)]


def quant_matmuls(model: nn.Module) -> List[Tuple[str, QuantMatmul]]:
    """``(name, matmul)`` for every quantized matmul in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantMatmul)]


def matmul_quantizers(model: nn.Module) -> List[Tuple[str, QuantMatmul, ActivationQuantizer]]:
    """``(name, matmul, quantizer)`` for every operand quantizer, named e.g. ``blocks.0.attn.matmul_qk.q``."""
    return [(f'{name}.{operand}', matmul, quantizer) for name, matmul in quant_matmuls(model)
            for operand, quantizer in matmul.quantizers()]
