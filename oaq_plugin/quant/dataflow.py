"""Where each tensor of one forward pass comes from: the graph facts that conversion decides on.

Every tensor of the pass is tagged, in a weak identity map (a freed tensor's id is never mistaken for a
new tensor's), with the layers whose outputs reach it without passing through another layer, the layers
that reach it through pass-through ops only (activations, reshapes, scalar arithmetic, batch norm), and
its resolution relative to what the first layers see, changed only by the ops that resample (strided
convs and pools, interpolation, pixel (un)shuffle, transposed convs), never by padding or cropping. From
those tags come the layer roles, the batch norms that take a conv's output directly, and the modules that
multiply two activations (attention).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import OAQError
from .attention import matmul_call
from .layers import wrapper_for

# The source tag of the network input (a layer name is never this).
INPUT = '<input>'

# Ops through which a layer's output still "feeds" what follows: one activation tensor in, the same
# values' transform out (elementwise activations, reshapes, batch norm, dropout).
PASS_THROUGH_OPS = frozenset({
    'relu', 'relu_', 'relu6', 'leaky_relu', 'leaky_relu_', 'prelu', 'rrelu', 'gelu', 'silu', 'silu_', 'mish',
    'elu', 'elu_', 'selu', 'celu', 'hardswish', 'hardsigmoid', 'hardtanh', 'hardtanh_', 'softplus', 'sigmoid',
    'tanh', 'clamp', 'clamp_', 'clip', 'dropout', 'dropout2d', 'batch_norm', 'view', 'reshape', 'permute',
    'contiguous', 'transpose', 'flatten', 'unflatten', 'clone', 'squeeze', 'unsqueeze', 'to', 'float',
    'type_as', 'detach', 'T', 'mT',
})
# Arithmetic that passes a layer's output through when its other operand is a number (residual scaling).
SCALAR_ARITHMETIC_OPS = frozenset({
    'add', 'add_', '__add__', '__radd__', '__iadd__', 'sub', 'sub_', '__sub__', '__rsub__', '__isub__', 'mul',
    'mul_', '__mul__', '__rmul__', '__imul__', 'div', 'div_', '__truediv__', '__itruediv__', 'neg', '__neg__',
})
# Ops that resample: the output's resolution is the input's times the ratio of their sizes.
RESAMPLING_OPS = frozenset({'pixel_shuffle', 'pixel_unshuffle', 'interpolate', 'upsample', 'upsample_nearest',
                            'upsample_bilinear', 'max_pool1d', 'max_pool2d', 'max_pool3d', 'avg_pool1d', 'avg_pool2d',
                            'avg_pool3d', 'adaptive_max_pool1d', 'adaptive_max_pool2d', 'adaptive_max_pool3d',
                            'adaptive_avg_pool1d', 'adaptive_avg_pool2d', 'adaptive_avg_pool3d'})
# Ops that resample only with a stride other than 1 (otherwise their size change is padding).
STRIDED_OPS = frozenset({'conv1d', 'conv2d', 'conv3d', 'conv_transpose1d', 'conv_transpose2d', 'conv_transpose3d'})
# A feature map is upsampled above this ratio of positions to the first layers' (1.2 per side): odd sizes
# that go down and up again (a stride-2 conv then a x2 shuffle: 95 -> 48 -> 96) stay below it.
UPSAMPLED_AREA = 1.44
# Sub-pixel convolution: the layers feeding it compute the high-resolution pixels themselves.
SUBPIXEL_OPS = frozenset({'pixel_shuffle'})


def op_name(func: Callable) -> str:
    """The name of a torch function as seen by a ``TorchFunctionMode`` (a property's own name for its getter)."""
    name = getattr(func, '__name__', '')
    if name == '__get__':
        return getattr(getattr(func, '__self__', None), '__name__', name)
    return name


def tensors_in(value: Any) -> List[torch.Tensor]:
    """The tensors in ``value`` (nested tuples, lists and dicts), each once, in order."""
    found: List[torch.Tensor] = []
    seen: Set[int] = set()

    def visit(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                found.append(item)
        elif isinstance(item, (list, tuple)):
            for element in item:
                visit(element)
        elif isinstance(item, dict):
            for element in item.values():
                visit(element)
    visit(value)
    return found


def area_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """Positions of ``after`` per position of ``before``, over the dimensions past batch and channels (1 when
    the two have different ranks or none)."""
    if before.dim() < 3 or after.dim() != before.dim() or math.prod(before.shape[2:]) == 0:
        return 1.0
    return math.prod(after.shape[2:]) / math.prod(before.shape[2:])


def _strided(stride: Any) -> bool:
    values = stride if isinstance(stride, (tuple, list)) else (stride,)
    return any(v != 1 for v in values)


@dataclass(frozen=True)
class Provenance:
    """Where a tensor comes from.

    Args:
        sources: Layers (or :data:`INPUT`) whose outputs reach the tensor without passing another layer.
        direct: Layers whose outputs reach it through pass-through ops only.
        resolution: Positions per position of what the first layers see. Resampling the input alone
            (normalising, padding, unshuffling it) sets what they see, so it leaves this at 1.
    """

    sources: FrozenSet[str] = frozenset()
    direct: FrozenSet[str] = frozenset()
    resolution: float = 1.0

    @property
    def upsampled(self) -> bool:
        return self.resolution > UPSAMPLED_AREA


@dataclass
class DataflowTrace:
    """What one forward pass showed about the graph (layers are the quantizable Conv2d/ConvTranspose2d/Linear).

    Args:
        order: Layers in the order they first ran.
        layer_inputs: Per layer, the provenance of its input at each call.
        layer_calls: Calls per layer.
        subpixel_feeders: Layers whose output reaches a pixel shuffle through pass-through ops.
        upsampling_layers: Layers that are themselves upsampling (strided transposed convs on features).
        output: Provenance of the network output.
        output_layers: Layers whose output tensor is itself (part of) the network output.
        consumers: Per layer, how many ops took its output tensor.
        batchnorm_inputs: Per batch-norm module, at each call, the layer whose output tensor it took (or None).
        matmuls: Per module that multiplies activations (both operands derived from the network input, neither
            a parameter or buffer), every matmul it runs in call order: its kind, or ``None`` for a product
            with a weight. Only modules whose descendants run no matmul and whose calls all ran the same
            sequence are listed: their matmuls can be told apart by call order alone.
        unroutable_matmuls: Modules that multiply activations but are not listed in ``matmuls``.
    """

    order: List[str] = field(default_factory=list)
    layer_inputs: Dict[str, List[Provenance]] = field(default_factory=dict)
    layer_calls: Counter = field(default_factory=Counter)
    subpixel_feeders: Set[str] = field(default_factory=set)
    upsampling_layers: Set[str] = field(default_factory=set)
    output: Provenance = field(default_factory=Provenance)
    output_layers: Set[str] = field(default_factory=set)
    consumers: Counter = field(default_factory=Counter)
    batchnorm_inputs: Dict[str, List[Optional[str]]] = field(default_factory=dict)
    matmuls: Dict[str, List[Optional[str]]] = field(default_factory=dict)
    unroutable_matmuls: Set[str] = field(default_factory=set)

    def roles(self) -> Dict[str, str]:
        """``first``, ``last``, ``upsampler`` or ``body`` for every layer that ran.

        ``first``: a layer whose input derives from the network input alone. ``last``: a layer whose output
        reaches the network output without passing another layer. ``upsampler``: a layer feeding a pixel
        shuffle through pass-through ops, a strided transposed conv, or a layer whose input has a higher
        resolution than the first layers' input (the high-resolution tail). Earlier roles in that list win.
        """
        first = {name for name in self.order if any(p.sources == {INPUT} for p in self.layer_inputs[name])}
        if not first and self.order:
            first = {self.order[0]}
        last = {name for name in self.output.sources if name in self.layer_calls}
        if not last and self.order:
            last = {self.order[-1]}
        upsampler = set(self.subpixel_feeders) | set(self.upsampling_layers)
        upsampler |= {name for name in self.order if any(p.upsampled for p in self.layer_inputs[name])}
        roles = {}
        for name in self.order:
            if name in first:
                roles[name] = 'first'
            elif name in last:
                roles[name] = 'last'
            elif name in upsampler:
                roles[name] = 'upsampler'
            else:
                roles[name] = 'body'
        return roles


@dataclass
class _Frame:
    """A running module: its name, whether it is a layer, the matmuls it ran itself, and whether a
    descendant ran one."""

    name: str
    is_layer: bool
    matmuls: List[Optional[str]] = field(default_factory=list)
    nested_matmul: bool = False


class _Tracer(TorchFunctionMode):
    """Tags every tensor an op makes from tagged tensors, and records what the trace needs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.trace = DataflowTrace()
        self.tags = WeakIdKeyDictionary()
        self.owners = WeakIdKeyDictionary()  # a layer's output tensor -> the layer
        self.buffer_ids = {id(b) for b in model.buffers()}
        # Running modules, innermost last.
        self.stack: List[_Frame] = []
        # Per module, the matmul sequence of its first call (None once it cannot be routed).
        self.sequences: Dict[str, Optional[List[Optional[str]]]] = {}
        self.multiplies_activations: List[str] = []  # in the order their first call ended

    def is_weight(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, nn.Parameter) or id(tensor) in self.buffer_ids

    def tag(self, tensor: Any) -> Provenance:
        if isinstance(tensor, torch.Tensor) and tensor in self.tags:
            return self.tags[tensor]
        return Provenance()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self._record(func, args, kwargs, result)
        return result

    def _record(self, func: Callable, args: tuple, kwargs: dict, result: Any) -> None:
        name = op_name(func)
        inputs = tensors_in((args, kwargs))
        outputs = [args[0]] if name == '__setitem__' and inputs else tensors_in(result)
        if not outputs:
            return
        for tensor in inputs:
            owner = self.owners.get(tensor)
            if owner is not None:
                self.trace.consumers[owner] += 1
        call = matmul_call(func, args, kwargs)
        if call is not None and self.stack:
            kind, operands = call
            activations = all(t in self.tags and not self.is_weight(t) for t in operands)
            self.stack[-1].matmuls.append(kind if activations else None)
            for frame in self.stack[:-1]:
                frame.nested_matmul = True
        tagged = [self.tags[t] for t in inputs if t in self.tags]
        if not tagged:
            return
        sources = frozenset().union(*(t.sources for t in tagged))
        resolution = max(t.resolution for t in tagged)
        if sources - {INPUT}:
            stride = args[3] if len(args) > 3 else kwargs.get('stride', 1)
            if name in RESAMPLING_OPS or (name in STRIDED_OPS and _strided(stride)):
                resolution *= area_ratio(inputs[0], outputs[0])
        if name in SUBPIXEL_OPS:
            self.trace.subpixel_feeders |= self.tag(inputs[0]).direct
        direct: FrozenSet[str] = frozenset()
        if len(tagged) == 1 and (name in PASS_THROUGH_OPS or (name in SCALAR_ARITHMETIC_OPS and len(inputs) == 1)):
            direct = tagged[0].direct
        provenance = Provenance(sources, direct, resolution)
        for tensor in outputs:
            self.tags[tensor] = provenance

    # -- module hooks --------------------------------------------------------------------------------
    def enter(self, name: str, module: nn.Module):
        def hook(mod, args):
            # A layer's matmuls are its weight product: a layer is never routed (``is_layer``).
            self.stack.append(_Frame(name, wrapper_for(module) is not None))
        return hook

    def leave(self, name: str):
        def hook(mod, args, output):
            frame = self.stack.pop()
            if name in self.sequences:
                if self.sequences[name] != frame.matmuls or frame.nested_matmul:
                    self.sequences[name] = None
            else:
                routable = not frame.is_layer and not frame.nested_matmul
                self.sequences[name] = frame.matmuls if routable else None
            if any(kind is not None for kind in frame.matmuls) and name not in self.multiplies_activations:
                self.multiplies_activations.append(name)
        return hook

    def layer_input(self, name: str):
        def hook(mod, args):
            self.trace.layer_inputs.setdefault(name, []).append(self.tag(args[0] if args else None))
        return hook

    def layer_output(self, name: str, module: nn.Module):
        def hook(mod, args, output):
            trace = self.trace
            if name not in trace.layer_calls:
                trace.order.append(name)
            trace.layer_calls[name] += 1
            if not isinstance(output, torch.Tensor):
                return
            before = self.tag(args[0] if args else None)
            resolution = before.resolution
            if args and isinstance(args[0], torch.Tensor) and _strided(getattr(module, 'stride', 1)):
                ratio = area_ratio(args[0], output)
                resolution *= ratio
                if ratio > 1:
                    trace.upsampling_layers.add(name)
            self.tags[output] = Provenance(frozenset({name}), frozenset({name}), resolution)
            self.owners[output] = name
        return hook

    def batchnorm_input(self, name: str):
        def hook(mod, args):
            producer = self.owners.get(args[0]) if args and isinstance(args[0], torch.Tensor) else None
            self.trace.batchnorm_inputs.setdefault(name, []).append(producer)
        return hook


def trace_dataflow(model: nn.Module, example_input: torch.Tensor) -> DataflowTrace:
    """Run ``model`` once on ``example_input`` (eval mode, no gradients) and return what its graph showed.

    Raises:
        OAQError: The model cannot run on the example input.
    """
    tracer = _Tracer(model)
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(tracer.enter(name, module)))
        if wrapper_for(module) is not None:
            handles.append(module.register_forward_pre_hook(tracer.layer_input(name)))
            handles.append(module.register_forward_hook(tracer.layer_output(name, module)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(tracer.batchnorm_input(name)))
        handles.append(module.register_forward_hook(tracer.leave(name), always_call=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            tracer.tags[example_input] = Provenance(frozenset({INPUT}))
            output = model(example_input)
            outputs = tensors_in(output)
            tracer.trace.output = Provenance(
                frozenset().union(*(tracer.tag(t).sources for t in outputs)) if outputs else frozenset())
            tracer.trace.output_layers = {tracer.owners[t] for t in outputs if t in tracer.owners}
        for name in tracer.multiplies_activations:
            sequence = tracer.sequences.get(name)
            if sequence is None:
                tracer.trace.unroutable_matmuls.add(name)
            else:
                tracer.trace.matmuls[name] = sequence
    except Exception as error:  # a model that cannot run the example cannot be converted either
        raise OAQError(f'could not run the model on an example input of shape {tuple(example_input.shape)} '
                       f'to trace its layers: {type(error).__name__}: {error}') from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return tracer.trace
