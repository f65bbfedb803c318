"""Turn any ``nn.Module`` into a quantized copy: which layers, at which bits, with which quantizers.

The roles of the fully-quantized protocol are detected by running one small example input:
the first and last quantizable layers to execute, every layer whose output feeds a pixel shuffle,
and every layer running at a higher resolution than the input (the upsampling tail) are ``first``,
``last`` and ``upsampler``; the rest is ``body``.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import OAQConfig, parse_layer_bits
from ..errors import OAQError, UnsupportedLayerError
from .activation import ActivationQuantizer
from .attention import QuantMatmul, QuantWindowAttention, window_attention_modules
from .dual_region import DualRegionQuantizer
from .layers import QuantLayer, wrapper_for
from .uniform import UniformQuantizer
from .weight import WeightQuantizer

ROLES = ('first', 'last', 'upsampler', 'body')
PASS_THROUGH_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Identity)


@dataclass
class LayerPlan:
    """What the conversion does to one layer."""

    name: str
    kind: str
    role: str
    w_bits: Optional[int]
    a_bits: Optional[int]

    @property
    def quantized(self) -> bool:
        return self.w_bits is not None

    def to_dict(self) -> dict:
        return asdict(self)


class _PixelShuffleWatcher(TorchFunctionMode):
    """Notes the inputs of every pixel_shuffle call, functional or module."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.pixel_shuffle, torch.nn.functional.pixel_shuffle) and args:
            self.inputs.append(args[0])
        return func(*args, **kwargs)


def detect_roles(model: nn.Module, example_input: torch.Tensor) -> Dict[str, str]:
    """Role of every quantizable layer that runs on ``example_input`` (layers that never run are absent)."""
    order: List[str] = []
    outputs: Dict[int, str] = {}
    input_size = example_input.shape[-2:] if example_input.dim() == 4 else None
    high_resolution = set()
    handles = []

    def layer_hook(name):
        def hook(module, inputs, output):
            if name not in order:
                order.append(name)
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = name
            x = inputs[0] if inputs else None
            if (input_size is not None and isinstance(x, torch.Tensor) and x.dim() == 4
                    and (x.shape[-2] > input_size[0] or x.shape[-1] > input_size[1])):
                high_resolution.add(name)
        return hook

    def pass_hook(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and id(inputs[0]) in outputs:
            outputs[id(output)] = outputs[id(inputs[0])]

    for name, module in model.named_modules():
        if wrapper_for(module) is not None:
            handles.append(module.register_forward_hook(layer_hook(name)))
        elif isinstance(module, PASS_THROUGH_MODULES):
            handles.append(module.register_forward_hook(pass_hook))
    watcher = _PixelShuffleWatcher()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), watcher:
            model(example_input)
    except Exception as error:  # a model that cannot run the example cannot be converted either
        raise OAQError(f'could not run the model on an example input of shape {tuple(example_input.shape)} '
                       f'to find its first/last/upsampler layers: {type(error).__name__}: {error}') from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    feeding_shuffle = {outputs[id(t)] for t in watcher.inputs if id(t) in outputs}
    roles = {}
    for index, name in enumerate(order):
        if index == 0:
            roles[name] = 'first'
        elif index == len(order) - 1:
            roles[name] = 'last'
        elif name in feeding_shuffle or name in high_resolution:
            roles[name] = 'upsampler'
        else:
            roles[name] = 'body'
    return roles


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
    """The per-layer plan: role and bits of every Conv2d/ConvTranspose2d/Linear, overrides applied."""
    roles = detect_roles(model, example_input) if example_input is not None else {}
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
                               w_bits=None if bits is None else bits[0], a_bits=None if bits is None else bits[1]))
    return plans


def make_act_quantizer(config: OAQConfig, bits: int) -> ActivationQuantizer:
    """The activation quantizer the config asks for, at ``bits``."""
    calib = config.calib
    common = dict(percentile=calib.percentile, sample_size=calib.sample_size, seed=calib.seed)
    if config.act_quantizer == 'dual_region':
        return DualRegionQuantizer(bits, levels=config.levels, breakpoint_stat=calib.breakpoint_stat, **common)
    return UniformQuantizer(bits, method=config.act_quantizer, **common)


def wrap_layer(module: nn.Module, plan: LayerPlan, config: OAQConfig) -> QuantLayer:
    wrapper = wrapper_for(module)
    if wrapper is None:
        raise UnsupportedLayerError(f"layer '{plan.name}' ({type(module).__name__}) cannot be quantized; "
                                    'supported: Conv2d, ConvTranspose2d, Linear')
    weight_quantizer = WeightQuantizer(plan.w_bits, granularity=config.weight_granularity,
                                       channel_axis=wrapper.weight_channel_axis, grid=config.weight_grid)
    return wrapper(module, make_act_quantizer(config, plan.a_bits), weight_quantizer, name=plan.name,
                   role=plan.role)


def attention_bits(name: str, config: OAQConfig) -> Optional[int]:
    """Bits of the matmul operands of the attention module ``name`` (``None``: left in float).

    ``a_bits``, unless an ``exclude`` pattern matches the module's name (float) or a ``layer_bits``
    pattern does (its activation bits, or float).
    """
    bits = pattern_bits(name, (config.w_bits, config.a_bits), config)
    return None if bits is None else bits[1]


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
        make_quantizer = functools.partial(make_act_quantizer, config, bits)
        _set_submodule(qmodel, name, QuantWindowAttention(module, make_quantizer, name))
        wrapped.append(name)
    return wrapped


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert(model: nn.Module, config: OAQConfig, example_input: Optional[torch.Tensor] = None,
            plans: Optional[List[LayerPlan]] = None) -> nn.Module:
    """A deep copy of ``model`` with the planned layers wrapped; the float model is left untouched.

    With ``config.quantize_attention`` the window-attention modules are wrapped too (:func:`wrap_attention`).

    Args:
        model: Any module.
        config: The method's configuration.
        example_input: A small input the model accepts, used to detect first/last/upsampler layers.
        plans: A plan to apply instead of planning (e.g. when restoring a saved quantized model).
    """
    qmodel = copy.deepcopy(model).eval()
    if plans is None:
        plans = plan_layers(qmodel, config, example_input)
    if not any(p.quantized for p in plans):
        raise OAQError('no layer to quantize: the model has no Conv2d/ConvTranspose2d/Linear layer that runs, '
                       'or every one is excluded')
    for plan in plans:
        if plan.quantized:
            _set_submodule(qmodel, plan.name, wrap_layer(qmodel.get_submodule(plan.name), plan, config))
    if config.quantize_attention:
        wrap_attention(qmodel, config, plans)
    qmodel.oaq_plans = plans
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
