"""What a converted network computes at which bit width: multiply-adds per quantized layer, per quantized
matmul, and per op left in float, counted on one traced forward.

Counted: Conv2d/ConvTranspose2d/Linear (module or functional), matmul/``@``/bmm/einsum/baddbmm/addmm,
scaled dot-product attention, and the float ops with a learned parameter (normalisations, PReLU, a
parameter in elementwise arithmetic: one multiply-add per output element). Arithmetic between two
activations (residual sums, attention gates) and parameter-free activations are not multiply-adds of the
network's weights and are not counted.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .attention import QuantMatmul, matmul_call
from .dataflow import op_name, tensors_in
from .layers import QuantLayer, wrapper_for

FLOAT = 'float'
# Ops whose multiply-adds follow from operand shapes (see :func:`op_macs`).
PRODUCT_OPS = frozenset({'conv1d', 'conv2d', 'conv3d', 'conv_transpose1d', 'conv_transpose2d', 'conv_transpose3d',
                         'linear', 'matmul', '__matmul__', '__rmatmul__', 'mm', 'bmm', 'baddbmm', 'addmm', 'einsum',
                         'scaled_dot_product_attention'})
# Normalisations: a scale and a shift per element, counted as one multiply-add per output element.
NORM_OPS = frozenset({'layer_norm', 'group_norm', 'batch_norm', 'instance_norm', 'rms_norm'})
# Ops counted (one multiply-add per output element) when one operand is a learned parameter.
PARAMETER_OPS = frozenset({
    'prelu', 'add', 'add_', '__add__', '__radd__', '__iadd__', 'sub', 'sub_', '__sub__', '__rsub__', 'mul', 'mul_',
    '__mul__', '__rmul__', '__imul__', 'div', 'div_', '__truediv__', 'addcmul',
})


def bits_label(kind: str, left_bits: Optional[int], right_bits: Optional[int]) -> str:
    """``W4A4`` for a layer (weight and input bits), ``A8A8`` for a matmul of two activations, else ``float``."""
    if left_bits is None or right_bits is None:
        return FLOAT
    return f'W{left_bits}A{right_bits}' if kind == 'layer' else f'A{left_bits}A{right_bits}'


def _einsum_macs(equation: str, operands: List[torch.Tensor]) -> int:
    inputs = equation.replace(' ', '').split('->')[0].split(',')
    sizes: Dict[str, int] = {}
    for letters, tensor in zip(inputs, operands):
        if '...' in letters:
            return 0  # broadcast dimensions: not counted rather than guessed
        sizes.update(zip(letters, tensor.shape))
    return math.prod(sizes.values())


def op_macs(name: str, args: tuple, kwargs: dict, output: Any) -> int:
    """Multiply-adds of one call of a product op ``name`` (0 when the shapes are not the expected ones)."""
    outputs = tensors_in(output)
    if not outputs:
        return 0
    out = outputs[0]
    if name in ('conv1d', 'conv2d', 'conv3d', 'linear'):
        weight = args[1] if len(args) > 1 else kwargs.get('weight')
        return out.numel() * math.prod(weight.shape[1:]) if isinstance(weight, torch.Tensor) else 0
    if name.startswith('conv_transpose'):
        x = args[0]
        weight = args[1] if len(args) > 1 else kwargs.get('weight')
        return x.numel() * math.prod(weight.shape[1:]) if isinstance(weight, torch.Tensor) else 0
    if name in ('baddbmm', 'addmm'):
        left = args[1] if len(args) > 1 else kwargs.get('batch1', kwargs.get('mat1'))
        return out.numel() * left.shape[-1] if isinstance(left, torch.Tensor) else 0
    if name == 'einsum':
        call = matmul_call(torch.einsum, args, kwargs)
        return _einsum_macs(args[0], call[1]) if call is not None and isinstance(args[0], str) else 0
    if name == 'scaled_dot_product_attention':
        query, key, value = (tensors_in(args) + [None, None, None])[:3]
        if value is None:
            return 0
        return (out.numel() // value.shape[-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])
    left = args[1] if name == '__rmatmul__' else args[0]
    return out.numel() * (left.shape[-1] if left.dim() > 0 else 1)


def float_reason(kind: str) -> str:
    """Why an op of ``kind`` (a layer class name or a torch function name) runs in float, for reports."""
    if kind[:1].isupper():  # a layer class (Conv2d, Linear or a subclass); ops are named by torch function
        return 'a quantizable layer the plan leaves in float (oaq.exclude, layer_bits: float, protocol float_ends)'
    if kind in ('matmul', '__matmul__', '__rmatmul__', 'mm', 'bmm', 'baddbmm', 'addmm', 'einsum',
                'scaled_dot_product_attention'):
        return ('a product of two activations (attention): quantized only where quantize_attention (window '
                'attention) or quantize_generic_attention covers its module')
    if kind in PRODUCT_OPS:
        return (f'a convolution or projection called as F.{kind} with a module\'s weight, not through a layer '
                'module: only Conv2d/ConvTranspose2d/Linear modules are wrapped')
    if kind in NORM_OPS:
        return 'a normalisation (a learned scale and shift per element): no quantized form, kept in float'
    if kind == 'prelu':
        return "a PReLU's learned slope: elementwise, kept in float"
    return 'elementwise arithmetic with a learned parameter: kept in float'


@dataclass
class FloatOp:
    """One op (or a module's ops of one kind) left in float, with its multiply-adds per forward and why."""

    name: str
    kind: str
    macs: int
    share: float = 0.0
    reason: str = ''

    def to_dict(self) -> dict:
        return {'name': self.name, 'kind': self.kind, 'macs': self.macs, 'share': self.share,
                'reason': self.reason or float_reason(self.kind)}


@dataclass
class OpAccounting:
    """Multiply-adds of one forward of the example input, by bit width, and the ops left in float.

    Args:
        total_macs: All counted multiply-adds.
        macs_by_bits: Per label (``W4A4``, ``W8A8``, ``A4A4`` for quantized activation matmuls, ``float``).
        float_ops: Every counted op left in float, largest first.
        input_shape: Shape of the example input the counts are for.
    """

    total_macs: int
    macs_by_bits: Dict[str, int]
    float_ops: List[FloatOp] = field(default_factory=list)
    input_shape: Tuple[int, ...] = ()

    def share(self, label: str) -> float:
        return self.macs_by_bits.get(label, 0) / self.total_macs if self.total_macs else 0.0

    def to_dict(self) -> dict:
        return {
            'input_shape': list(self.input_shape),
            'total_macs': self.total_macs,
            'macs_by_bits': {label: {'macs': macs, 'share': self.share(label)}
                             for label, macs in self.macs_by_bits.items()},
            'float_ops': [op.to_dict() for op in self.float_ops],
        }

    def summary(self) -> str:
        """One line: the share of multiply-adds at each label."""
        parts = [f'{label} {100 * self.share(label):.1f}%' for label in self.macs_by_bits]
        return f"multiply-adds: {', '.join(parts)} of {self.total_macs / 1e6:.1f} M per forward"


class _Counter(TorchFunctionMode):
    """Counts product and parameter ops, each charged to the innermost quantized or float layer running."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.parameter_owner = {id(p): name for name, module in model.named_modules()
                                for p in module.parameters(recurse=False)}
        # Running modules, innermost last: (name, module).
        self.stack: List[Tuple[str, nn.Module]] = []
        self.by_bits: Dict[str, int] = OrderedDict()
        self.float_ops: Dict[Tuple[str, str], int] = OrderedDict()
        # Tensors computed from parameters alone (``self.weight[:, None, None]``, ``self.scale.exp()``):
        # an op on one of them and an activation is an op with a learned parameter.
        self.parameter_derived = WeakIdKeyDictionary()

    def _is_parameter(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, nn.Parameter) or tensor in self.parameter_derived

    def _charge(self, label: str, macs: int, name: str = '', kind: str = '') -> None:
        self.by_bits[label] = self.by_bits.get(label, 0) + macs
        if label == FLOAT:
            self.float_ops[(name, kind)] = self.float_ops.get((name, kind), 0) + macs

    def _owner(self) -> Optional[Tuple[str, nn.Module]]:
        """The running quantized layer or matmul, else the innermost running float layer: it accounts for
        every product run inside it."""
        for name, module in reversed(self.stack):
            if isinstance(module, (QuantLayer, QuantMatmul)):
                return name, module
        for name, module in reversed(self.stack):
            if wrapper_for(module) is not None:
                return name, module
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = op_name(func)
        inputs = tensors_in((args, kwargs))
        if inputs and all(self._is_parameter(t) for t in inputs):
            for tensor in tensors_in(result):
                self.parameter_derived[tensor] = True
        if name in PRODUCT_OPS:
            self._count_product(name, args, kwargs, result)
        elif name in PARAMETER_OPS or name in NORM_OPS:
            self._count_parameter_op(name, args, kwargs, result)
        return result

    def _count_product(self, name: str, args: tuple, kwargs: dict, result: Any) -> None:
        macs = op_macs(name, args, kwargs, result)
        owner = self._owner()
        if owner is not None:
            owner_name, module = owner
            if isinstance(module, QuantLayer):
                label = bits_label('layer', module.weight_quantizer.bits, module.act_quantizer.bits)
                self._charge(label, macs, owner_name, type(module.module).__name__)
            elif isinstance(module, QuantMatmul):
                (_, left), (_, right) = module.quantizers()
                self._charge(bits_label('matmul', left.bits, right.bits), macs, owner_name, 'matmul')
            else:
                self._charge(FLOAT, macs, owner_name, type(module).__name__)
            return
        weights = [t for t in tensors_in((args, kwargs)) if id(t) in self.parameter_owner]
        where = self.parameter_owner[id(weights[0])] if weights else (self.stack[-1][0] if self.stack else '')
        self._charge(FLOAT, macs, where or '<model>', name)

    def _count_parameter_op(self, name: str, args: tuple, kwargs: dict, result: Any) -> None:
        if self._owner() is not None:
            return  # a layer's bias or a quantizer's arithmetic: part of that layer
        inputs = tensors_in((args, kwargs))
        parameters = [t for t in inputs if self._is_parameter(t)]
        outputs = tensors_in(result)
        if not outputs or len(parameters) == len(inputs) or (not parameters and name not in NORM_OPS):
            return  # no parameter, or parameters alone (a weight computed once per forward, not per pixel)
        where = self.stack[-1][0] if self.stack else ''
        self._charge(FLOAT, outputs[0].numel(), where or '<model>', name)

    def enter(self, name: str, module: nn.Module) -> Callable:
        def hook(mod, args):
            self.stack.append((name, module))
        return hook

    def leave(self, mod, args, output) -> None:
        self.stack.pop()


def count_operations(model: nn.Module, example_input: torch.Tensor) -> OpAccounting:
    """Multiply-adds of ``model`` on ``example_input``, by bit width, with every float op listed.

    Quantized layers and matmuls run in ``float`` mode for the count (their modes are restored after):
    the count depends on the plan and the shapes, not on calibration.
    """
    counter = _Counter(model)
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(counter.enter(name, module)))
        handles.append(module.register_forward_hook(counter.leave, always_call=True))
    quantized = [m for m in model.modules() if isinstance(m, (QuantLayer, QuantMatmul))]
    modes = [m.mode for m in quantized]
    was_training = model.training
    model.eval()
    try:
        for module in quantized:
            module.set_mode('float')
        with torch.no_grad(), counter:
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in zip(quantized, modes):
            module.set_mode(mode)
        model.train(was_training)
    total = sum(counter.by_bits.values())
    float_ops = [FloatOp(name, kind, macs, macs / total if total else 0.0)
                 for (name, kind), macs in counter.float_ops.items()]
    float_ops.sort(key=lambda op: -op.macs)
    by_bits = dict(sorted(counter.by_bits.items(), key=lambda item: -item[1]))
    return OpAccounting(total_macs=total, macs_by_bits=by_bits, float_ops=float_ops,
                        input_shape=tuple(example_input.shape))
