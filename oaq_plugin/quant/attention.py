"""Activation quantizers on the matmuls of attention: SwinIR-style window attention, and any module that
multiplies two activations (``q @ k.transpose``, ``torch.matmul``, ``bmm``, ``einsum``, scaled dot-product
attention).

Window-attention modules are recognised by their structure, not by importing their architecture: a
``qkv`` and a ``proj`` layer, ``num_heads``, ``scale``, ``window_size``, a relative-position bias table
with its index, and ``forward(x, mask)``. Other modules are recognised by the calls they make (a trace of
one forward): their activation-by-activation matmuls are routed, call by call, to quantized matmuls. The
matmuls run as fake quantization on every backend: the integer reference and the Triton kernels replace
only Conv2d/ConvTranspose2d/Linear layers.
"""
from __future__ import annotations

import inspect
import math
import threading
import types
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import NumericalError, UnsupportedLayerError
from .activation import ActivationQuantizer
from .layers import MODES
from .observer import all_finite

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

    def forward(self, left: torch.Tensor, right: torch.Tensor,
                op: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """``op(left, right)`` (``left @ right`` by default) on the operands, quantized in ``quant`` mode."""
        if self.mode == 'observe':
            for (operand, quantizer), value in zip(self.quantizers(), (left, right)):
                if not all_finite(value):
                    raise NumericalError(f"non-finite values (NaN/Inf) in operand '{operand}' of matmul "
                                         f"'{self.layer_name}' during calibration; check the input range and "
                                         'the checkpoint')
                quantizer.observe(value, self.batch_index)
        elif self.mode == 'quant':
            left_quantizer, right_quantizer = (quantizer for _, quantizer in self.quantizers())
            left, right = left_quantizer(left), right_quantizer(right)
        return left @ right if op is None else op(left, right)

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


# -- activation-by-activation matmuls in any module ---------------------------------------------------
SDPA = 'scaled_dot_product_attention'
# Torch functions multiplying two tensors, by the name a TorchFunctionMode sees, and the kind recorded.
MATMUL_KINDS = {'matmul': 'matmul', '__matmul__': 'matmul', '__rmatmul__': 'matmul', 'bmm': 'bmm',
                'einsum': 'einsum', SDPA: SDPA}
_SDPA_ARGUMENTS = ('query', 'key', 'value', 'attn_mask', 'dropout_p', 'is_causal', 'scale', 'enable_gqa')


def matmul_call(func: Callable, args: tuple, kwargs: dict) -> Optional[Tuple[str, List[torch.Tensor]]]:
    """``(kind, operands)`` when ``func(*args, **kwargs)`` is a product of two tensors, else ``None``.

    Kinds: ``matmul`` (``@``, ``torch.matmul``), ``bmm``, ``einsum`` (two operands) and
    ``scaled_dot_product_attention`` (operands query, key, value).
    """
    name = getattr(func, '__name__', '')
    kind = MATMUL_KINDS.get(name)
    if kind is None:
        return None
    if kind == 'einsum':
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    elif kind == SDPA:
        bound = dict(zip(_SDPA_ARGUMENTS, args), **kwargs)
        operands = [bound.get('query'), bound.get('key'), bound.get('value')]
    elif name == '__rmatmul__':
        operands = [args[1], args[0]] if len(args) == 2 else []
    else:
        operands = list(args[:2])
    if kind != SDPA and len(operands) != 2:
        return None
    if not all(isinstance(t, torch.Tensor) for t in operands):
        return None
    return kind, operands


def matmul_slots(kinds: Sequence[Optional[str]]) -> List[Tuple[str, Tuple[str, str]]]:
    """``(attribute, (left operand, right operand))`` of the quantized matmuls that serve ``kinds`` in order.

    ``kinds`` has one entry per matmul the module runs: its kind, or ``None`` for one left alone (a product
    with a weight). A plain matmul (``matmul``, ``bmm``, ``einsum``) is one ``quant_matmul<i>``; scaled dot-product
    attention is two, ``quant_sdpa<i>_qk`` (scaled queries, transposed keys) and ``quant_sdpa<i>_av``
    (softmax output, values), as in window attention.
    """
    slots = []
    for index, kind in enumerate(kinds):
        if kind is None:
            continue
        if kind == SDPA:
            slots += [(f'quant_sdpa{index}_qk', ('q', 'k')), (f'quant_sdpa{index}_av', ('attn', 'v'))]
        else:
            slots.append((f'quant_matmul{index}', ('left', 'right')))
    return slots


class _Routing(threading.local):
    depth = 0


# While a quantized matmul runs, the matmuls inside it are its own: routers of enclosing modules pass them on.
_ROUTING = _Routing()


class _MatmulRouter(TorchFunctionMode):
    """During one forward of a module, sends its matmuls, call by call, to its quantized matmuls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = None if _ROUTING.depth else matmul_call(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        kind, operands = call
        kinds = self.module.oaq_matmul_kinds
        index = self.calls
        self.calls += 1
        expected = kinds[index] if index < len(kinds) else 'no matmul'
        if expected is None:
            return func(*args, **kwargs)
        if expected != kind:
            raise UnsupportedLayerError(
                f"module '{self.module.oaq_matmul_name}' ran {kind} as its matmul #{index}, but it was converted "
                f'for the sequence {kinds}; its matmuls must not depend on the input. Leave them in float with '
                'quantize_generic_attention: false, or with an exclude pattern naming the module')
        _ROUTING.depth += 1
        try:
            if kind == SDPA:
                return _quantized_sdpa(getattr(self.module, f'quant_sdpa{index}_qk'),
                                       getattr(self.module, f'quant_sdpa{index}_av'),
                                       **dict(zip(_SDPA_ARGUMENTS, args), **kwargs))
            matmul = getattr(self.module, f'quant_matmul{index}')
            if kind == 'einsum':
                equation = args[0]
                return matmul(*operands, op=lambda left, right: torch.einsum(equation, left, right))
            return matmul(*operands, op=torch.bmm if kind == 'bmm' else None)
        finally:
            _ROUTING.depth -= 1


def _quantized_sdpa(qk: QuantMatmul, av: QuantMatmul, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` written out, its two matmuls quantized (equal in float mode up to
    float rounding)."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    scores = qk(query * scale, key.transpose(-2, -1))
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float('-inf'))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float('-inf')) if attn_mask.dtype == torch.bool else scores + attn_mask
    attn = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        # The fused op drops whenever dropout_p > 0, whatever the module's mode: so does this.
        attn = F.dropout(attn, dropout_p, training=True)
    return av(attn, value)


def _routed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with _MatmulRouter(self):
        return type(self).forward(self, *args, **kwargs)


def quantize_matmul_calls(module: nn.Module, kinds: Sequence[Optional[str]],
                          make_quantizer: Callable[[], ActivationQuantizer], name: str = '') -> List[str]:
    """Quantize the activation matmuls ``module`` runs, in place.

    ``kinds`` lists every matmul of one forward of the module in call order (see :func:`matmul_slots`); the
    module's descendants must run none (:class:`~oaq_plugin.quant.dataflow.DataflowTrace` checks it).

    The module keeps its class, children and state-dict keys; it gains the quantized matmuls of
    :func:`matmul_slots` as children, and its forward, wrapped on the instance (so a deep copy keeps it),
    sends its ``i``-th matmul to slot ``i`` (or runs it in float when that slot is ``None``).

    Returns:
        The attribute names of the quantized matmuls added.

    Raises:
        UnsupportedLayerError: The module already has an attribute of one of those names.
    """
    slots = matmul_slots(kinds)
    for attribute, _ in slots:
        if hasattr(module, attribute):
            raise UnsupportedLayerError(f"module '{name}' already has an attribute '{attribute}'; its matmuls "
                                        'cannot be quantized (set quantize_generic_attention: false)')
    for attribute, (left, right) in slots:
        module.add_module(attribute, QuantMatmul((left, make_quantizer()), (right, make_quantizer()),
                                                 name=f'{name}.{attribute}' if name else attribute))
    module.oaq_matmul_kinds = list(kinds)
    module.oaq_matmul_name = name
    module.forward = types.MethodType(_routed_forward, module)
    return [attribute for attribute, _ in slots]
