"""Turn any ``nn.Module`` into a quantized copy: which layers, at which bits, with which quantizers.

The plan comes from the graph of one traced forward of a small example input (:mod:`.dataflow`), never
from tensor sizes: ``first`` is a layer whose input derives from the network input alone, ``last`` one
whose output reaches the network output without passing another layer, ``upsampler`` one feeding a pixel
shuffle, a transposed conv that upsamples, or one running on feature maps after an upsampling op; the
rest is ``body``. The same trace finds the eval-mode batch norms folded into the conv before them and the
modules whose activation-by-activation matmuls (generic attention) are quantized.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..config import CalibConfig, OAQConfig, parse_layer_bits
from ..errors import OAQError, UnsupportedLayerError
from .activation import ActivationQuantizer
from .attention import (QuantMatmul, QuantWindowAttention, is_window_attention, quantize_matmul_calls,
                        window_attention_modules)
from .batchnorm_folding import apply_batchnorm_folds, foldable_batchnorms
from .dataflow import DataflowTrace, trace_dataflow
from .dual_region import DualRegionQuantizer
from .layers import QuantLayer, wrapper_for
from .op_accounting import count_operations
from .uniform import UniformQuantizer
from .weight import WeightQuantizer

ROLES = ('first', 'last', 'upsampler', 'body')
# The plan kind of a module whose activation matmuls are quantized (generic attention).
ATTENTION_MATMULS = 'attention_matmuls'


@dataclass
class LayerPlan:
    """What the conversion does to one layer, or to the activation matmuls of one module.

    Args:
        name: The module's name in the model.
        kind: The layer's class name, or ``attention_matmuls`` for a module whose matmuls of two
            activations are quantized (both operands at ``a_bits``).
        role: ``first``, ``last``, ``upsampler``, ``body`` or ``unused`` (a layer that never ran).
        w_bits: Weight bits (``None``: float; always ``None`` for matmuls).
        a_bits: Input (operand) bits, ``None`` for float.
        folded_batchnorm: The eval-mode ``BatchNorm2d`` folded into this conv before quantization, if any.
        matmuls: For ``attention_matmuls``: every matmul of one forward of the module, in call order, by kind
            (``matmul``, ``bmm``, ``einsum``, ``scaled_dot_product_attention``), ``None`` for one left alone.
    """

    name: str
    kind: str
    role: str
    w_bits: Optional[int]
    a_bits: Optional[int]
    folded_batchnorm: Optional[str] = None
    matmuls: Optional[List[Optional[str]]] = None

    @property
    def is_layer(self) -> bool:
        return self.kind != ATTENTION_MATMULS

    @property
    def quantized(self) -> bool:
        return self.w_bits is not None if self.is_layer else self.a_bits is not None

    def to_dict(self) -> dict:
        return asdict(self)


def detect_roles(model: nn.Module, example_input: torch.Tensor) -> Dict[str, str]:
    """Role of every quantizable layer that runs on ``example_input`` (layers that never run are absent)."""
    return trace_dataflow(model, example_input).roles()


def pattern_bits(name: str, bits: Optional[tuple], config: OAQConfig) -> Optional[tuple]:
    """``bits`` (``(w_bits, a_bits)`` or ``None`` for float) for the module ``name`` after the config's name
    patterns: ``None`` if an ``exclude`` pattern matches, then the last matching ``layer_bits`` pattern wins."""
    if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
        bits = None
    for pattern, value in config.layer_bits.items():
        if fnmatch.fnmatchcase(name, pattern):
            bits = parse_layer_bits(pattern, value)
    return bits


def plan_layers(model: nn.Module, config: OAQConfig, example_input: Optional[torch.Tensor]) -> List[LayerPlan]:
    """The plan: role and bits of every Conv2d/ConvTranspose2d/Linear (overrides applied, the batch norm
    folded into it named), then the modules whose activation matmuls are quantized (:func:`plan_matmuls`)."""
    trace = trace_dataflow(model, example_input) if example_input is not None else None
    roles = trace.roles() if trace is not None else {}
    folds = {conv: bn for bn, conv in foldable_batchnorms(model, trace).items()} if trace is not None else {}
    plans = []
    for name, module in model.named_modules():
        if wrapper_for(module) is None or isinstance(module, QuantLayer):
            continue
        role = roles.get(name, 'body')
        if name not in roles and roles:
            role = 'unused'
        bits: Optional[tuple] = (config.w_bits, config.a_bits)
        if role in ('first', 'last', 'upsampler'):
            bits = None if config.float_ends() else (config.end_bits, config.end_bits)
        bits = pattern_bits(name, bits, config)
        if role == 'unused':
            bits = None
        plans.append(LayerPlan(name=name, kind=type(module).__name__, role=role,
                               w_bits=None if bits is None else bits[0], a_bits=None if bits is None else bits[1],
                               folded_batchnorm=folds.get(name)))
    if trace is not None and config.quantize_generic_attention:
        plans += plan_matmuls(model, config, trace)
    return plans


def plan_matmuls(model: nn.Module, config: OAQConfig, trace: DataflowTrace) -> List[LayerPlan]:
    """One ``attention_matmuls`` plan per module that multiplies two activations itself (in execution order).

    Window-attention modules are left to ``quantize_attention`` (:func:`wrap_attention`). A module whose
    ``exclude``/``layer_bits`` patterns leave it in float is planned with ``a_bits`` ``None``.
    """
    modules = dict(model.named_modules())
    plans = []
    for name, kinds in trace.matmuls.items():
        module = modules[name]
        if is_window_attention(module) or isinstance(module, QuantWindowAttention):
            continue
        plans.append(LayerPlan(name=name, kind=ATTENTION_MATMULS, role='body', w_bits=None,
                               a_bits=attention_bits(name, config), matmuls=list(kinds)))
    return plans


def make_act_quantizer(kind: str, bits: int, levels: str = OAQConfig.levels,
                       breakpoint_stat: str = CalibConfig.breakpoint_stat, percentile: float = CalibConfig.percentile,
                       sample_size: int = CalibConfig.sample_size, seed: int = CalibConfig.seed,
                       integer_lattice: bool = OAQConfig.integer_lattice) -> ActivationQuantizer:
    """An activation quantizer of ``kind`` (``dual_region`` or a uniform baseline) at ``bits``.

    ``levels`` and ``breakpoint_stat`` are read by the dual-region quantizer only; ``percentile``,
    ``sample_size`` and ``seed`` set its observer; ``integer_lattice`` puts its grids on an integer lattice.
    """
    common = dict(percentile=percentile, sample_size=sample_size, seed=seed, integer_lattice=integer_lattice)
    if kind == 'dual_region':
        return DualRegionQuantizer(bits, levels=levels, breakpoint_stat=breakpoint_stat, **common)
    return UniformQuantizer(bits, method=kind, **common)


def act_quantizer_factory(config: OAQConfig, bits: int) -> Callable[[], ActivationQuantizer]:
    """Makes the activation quantizers ``config`` asks for, at ``bits``."""
    calib = config.calib
    return functools.partial(make_act_quantizer, config.act_quantizer, bits, levels=config.levels,
                             breakpoint_stat=calib.breakpoint_stat, percentile=calib.percentile,
                             sample_size=calib.sample_size, seed=calib.seed,
                             integer_lattice=config.integer_lattice)


def wrap_layer(module: nn.Module, plan: LayerPlan, config: OAQConfig) -> QuantLayer:
    wrapper = wrapper_for(module)
    if wrapper is None:
        raise UnsupportedLayerError(f"layer '{plan.name}' ({type(module).__name__}) cannot be quantized; "
                                    'supported: Conv2d, ConvTranspose2d, Linear')
    weight_quantizer = WeightQuantizer(plan.w_bits, granularity=config.weight_granularity,
                                       channel_axis=wrapper.weight_channel_axis, grid=config.weight_grid)
    return wrapper(module, act_quantizer_factory(config, plan.a_bits)(), weight_quantizer, name=plan.name,
                   role=plan.role)


def attention_bits(name: str, config: OAQConfig) -> Optional[int]:
    """Bits of the matmul operands of the attention module ``name`` (``None``: left in float).

    ``a_bits``, unless an ``exclude`` pattern matches the module's name (float) or a ``layer_bits``
    pattern does (its activation bits, or float).
    """
    bits = pattern_bits(name, (config.w_bits, config.a_bits), config)
    return None if bits is None else bits[1]


def wrap_matmuls(qmodel: nn.Module, config: OAQConfig, plans: List[LayerPlan]) -> List[str]:
    """Quantize, in place, the activation matmuls of every module planned as ``attention_matmuls``.

    Returns the names of the quantized matmuls added (e.g. ``blocks.0.attn.quant_matmul0``).
    """
    added = []
    for plan in plans:
        if plan.is_layer or not plan.quantized:
            continue
        module = qmodel.get_submodule(plan.name)
        for attribute in quantize_matmul_calls(module, plan.matmuls, act_quantizer_factory(config, plan.a_bits),
                                               plan.name):
            added.append(f'{plan.name}.{attribute}' if plan.name else attribute)
    return added


def wrap_attention(qmodel: nn.Module, config: OAQConfig, plans: List[LayerPlan]) -> List[str]:
    """Replace every window-attention module of ``qmodel`` by :class:`QuantWindowAttention`, in place.

    Modules whose ``qkv`` layer never runs (planned as unused) or whose patterns leave them in float are
    skipped. Returns the names of the wrapped modules.

    Raises:
        UnsupportedLayerError: The model has no window-attention module at all.
    """
    found = window_attention_modules(qmodel)
    if not found:
        raise UnsupportedLayerError(
            f'oaq.quantize_attention is true, but {type(qmodel).__name__} has no window-attention module (one with '
            'qkv, proj, num_heads, scale, window_size, relative_position_bias_table, relative_position_index and '
            'forward(x, mask), as in SwinIR); set quantize_attention: false for this network')
    roles = {plan.name: plan.role for plan in plans}
    wrapped = []
    for name, module in found:
        bits = attention_bits(name, config)
        if bits is None or roles.get(f'{name}.qkv') == 'unused':
            continue
        _set_submodule(qmodel, name, QuantWindowAttention(module, act_quantizer_factory(config, bits), name))
        wrapped.append(name)
    return wrapped


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert(model: nn.Module, config: OAQConfig, example_input: Optional[torch.Tensor] = None,
            plans: Optional[List[LayerPlan]] = None) -> nn.Module:
    """A deep copy of ``model`` with the planned layers wrapped; the float model is left untouched.

    Eval-mode batch norms are folded into the conv before them first (the plans name them). With
    ``config.quantize_attention`` the window-attention modules are wrapped too (:func:`wrap_attention`);
    the activation matmuls of other modules are quantized as planned (:func:`wrap_matmuls`). With an
    example input, ``qmodel.oaq_op_accounting`` holds the multiply-adds at each bit width and the ops left
    in float (:func:`~oaq_plugin.quant.op_accounting.count_operations`); ``None`` otherwise.

    Args:
        model: Any module.
        config: The method's configuration.
        example_input: A small input the model accepts, used to trace the graph (roles, folds, matmuls).
        plans: A plan to apply instead of planning (e.g. when restoring a saved quantized model).
    """
    qmodel = copy.deepcopy(model).eval()
    if plans is None:
        plans = plan_layers(qmodel, config, example_input)
    if not any(p.quantized for p in plans if p.is_layer):
        raise OAQError('no layer to quantize: the model has no Conv2d/ConvTranspose2d/Linear layer that runs, '
                       'or every one is excluded')
    apply_batchnorm_folds(qmodel, {p.folded_batchnorm: p.name for p in plans if p.folded_batchnorm})
    for plan in plans:
        if plan.is_layer and plan.quantized:
            _set_submodule(qmodel, plan.name, wrap_layer(qmodel.get_submodule(plan.name), plan, config))
    if config.quantize_attention:
        wrap_attention(qmodel, config, plans)
    wrap_matmuls(qmodel, config, plans)
    qmodel.oaq_plans = plans
    qmodel.oaq_op_accounting = count_operations(qmodel, example_input) if example_input is not None else None
    for parameter in qmodel.parameters():
        parameter.requires_grad_(False)
    return qmodel


def quantized_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of everything in ``model`` that has a mode: quantized layers and quantized matmuls."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantLayer, QuantMatmul))]


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every quantized layer and matmul of ``model`` in ``observe``, ``quant`` or ``float`` mode."""
    for _, module in quantized_modules(model):
        module.set_mode(mode)


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """Within the block the modes of the quantized layers and matmuls may change; they are restored after."""
    modes = {name: module.mode for name, module in quantized_modules(model)}
    try:
        yield
    finally:
        for name, module in quantized_modules(model):
            module.set_mode(modes[name])
