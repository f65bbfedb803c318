"""Folding eval-mode batch norm into the conv before it, so that what is quantized is the conv that runs.

An integer engine runs ``BN(conv(x))`` as one conv with scaled weights and a shifted bias. Quantizing the
unfolded conv would put the weight grid on the pre-BN scale and leave a float op after every quantized
layer; folding first makes the quantized network the one an engine runs.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn

from .dataflow import DataflowTrace

FOLDABLE_LAYERS = (nn.Conv2d, nn.ConvTranspose2d)


def foldable_batchnorms(model: nn.Module, trace: DataflowTrace) -> Dict[str, str]:
    """``{batch norm: conv}`` for every ``BatchNorm2d`` that can be folded into the layer before it.

    A batch norm folds when it runs once, in eval mode with running statistics, on the very output tensor
    of a ``Conv2d``/``ConvTranspose2d`` that runs once, whose output nothing else uses (no other op, not
    the network output), whose output channels are the batch norm's, and whose parameters no other
    module shares.
    """
    modules = dict(model.named_modules())
    owners: Dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    folds = {}
    for bn_name, producers in trace.batchnorm_inputs.items():
        bn = modules[bn_name]
        if type(bn) is not nn.BatchNorm2d or len(producers) != 1 or producers[0] is None:
            continue
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            continue
        conv_name = producers[0]
        conv = modules[conv_name]
        if not isinstance(conv, FOLDABLE_LAYERS) or conv.out_channels != bn.num_features:
            continue
        if trace.layer_calls[conv_name] != 1 or trace.consumers[conv_name] != 1 or conv_name in trace.output_layers:
            continue
        if any(owners[id(p)] > 1 for p in conv.parameters(recurse=False)):
            continue
        folds[bn_name] = conv_name
    return folds


@torch.no_grad()
def fold_batchnorm(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (a bias is added when ``conv`` has none), computed in float64.

    ``bn(conv(x)) = conv'(x)`` with ``W' = W * s`` per output channel and ``b' = (b - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)``.
    """
    weight = conv.weight
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    folded = weight.double()
    if isinstance(conv, nn.ConvTranspose2d):
        # Weight (in, out / groups, kh, kw): the output channel of [i, j] is group(i) * out / groups + j.
        groups = conv.groups
        shape = folded.shape
        folded = (folded.reshape(groups, shape[0] // groups, shape[1], *shape[2:])
                  * scale.reshape(groups, 1, shape[1], 1, 1)).reshape(shape)
    else:
        folded = folded * scale.reshape(-1, *([1] * (folded.dim() - 1)))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = bias * scale + shift
    weight.copy_(folded.to(weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad)
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))


def apply_batchnorm_folds(model: nn.Module, folds: Mapping[str, str]) -> None:
    """Fold each batch norm of ``folds`` (``{batch norm: conv}``) into its conv and replace it by ``nn.Identity``."""
    for bn_name, conv_name in folds.items():
        fold_batchnorm(model.get_submodule(conv_name), model.get_submodule(bn_name))
        parent_name, _, child = bn_name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
