"""Feature taps for the finetuning loss: which intermediate tensors teacher and student are compared on.

``blocks`` taps the outputs of the network's repeated residual blocks, found without knowing the
architecture: a block is a module of a custom class that contains at least two quantizable layers and
maps one tensor to a tensor of the same shape; the class with the most such instances (ties: the one
holding more layers) is taken as the network's residual block. ``layers`` taps the input of every
quantized layer. A module that runs several times a forward (shared weights) gives one tap per call.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ...quant.forward_hooks import forward_hooks
from ...quant.layers import quant_layers, wrapper_for

TapKey = Tuple[str, int]

# Container classes group layers but are not blocks of the network's design.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def detect_blocks(model: nn.Module, example: torch.Tensor) -> List[str]:
    """Names of the residual blocks of ``model`` (empty when none is found)."""
    candidates: Dict[str, nn.Module] = {}
    shape_preserving = set()
    for name, module in model.named_modules():
        if not name or isinstance(module, _CONTAINERS) or wrapper_for(module) is not None:
            continue
        if _num_layers(module) < 2:
            continue
        candidates[name] = module

    def check_shape(name: str, module: nn.Module, args, output) -> None:
        if (len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
                and args[0].shape == output.shape):
            shape_preserving.add(name)
    with forward_hooks(candidates.items(), check_shape), torch.no_grad():
        model(example)
    by_class: Dict[type, List[str]] = {}
    for name in candidates:
        if name in shape_preserving:
            by_class.setdefault(type(candidates[name]), []).append(name)
    repeated = {cls: names for cls, names in by_class.items() if len(names) >= 2}
    if not repeated:
        return []

    def rank(item):
        cls, names = item
        return (len(names), _num_layers(candidates[names[0]]))
    _, names = max(repeated.items(), key=rank)
    return names


def _num_layers(module: nn.Module) -> int:
    """Quantizable layers inside ``module`` (a wrapper's float layer counts, the wrapper does not)."""
    return sum(1 for m in module.modules() if wrapper_for(m) is not None)


class FeatureTaps:
    """Records tap tensors of one model during a forward pass.

    Args:
        model: The model to tap.
        names: Module names whose outputs (``where='output'``) or inputs (``where='input'``) are tapped.
        where: ``output`` or ``input``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], where: str) -> None:
        self.features: Dict[TapKey, torch.Tensor] = {}
        self._calls: Counter = Counter()
        self._handles = []
        modules = dict(model.named_modules())
        for name in names:
            module = modules[name]
            if where == 'output':
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))

    def _record(self, name: str, value) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0]
        if isinstance(value, torch.Tensor):
            self.features[(name, self._calls[name])] = value
            self._calls[name] += 1

    def _output_hook(self, name: str):
        def hook(module, args, output):
            self._record(name, output)
        return hook

    def _input_hook(self, name: str):
        def hook(module, args):
            self._record(name, args[0] if args else None)
        return hook

    def clear(self) -> None:
        self.features = {}
        self._calls = Counter()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def tap_names(fp_model: nn.Module, qmodel: nn.Module, taps: str, patterns: Sequence[str],
              example: torch.Tensor) -> Tuple[List[str], str, str]:
    """``(names, where, kind)``: the tapped modules, whether their output or input, and what was used.

    ``patterns`` (fnmatch) name the tapped modules' outputs explicitly; otherwise ``taps`` decides, and
    ``blocks`` falls back to ``layers`` when the network has no repeated residual block.
    """
    if patterns:
        names = [name for name, _ in fp_model.named_modules()
                 if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        return names, 'output', 'patterns'
    if taps == 'blocks':
        names = detect_blocks(fp_model, example)
        if names:
            return names, 'output', 'blocks'
    return [name for name, _ in quant_layers(qmodel)], 'input', 'layers'
