"""Channel equalization before quantization (beyond the paper; ``OAQConfig.equalization``): where a conv's
output reaches other convs only through positively homogeneous ops (ReLU, LeakyReLU, PReLU), each of its
output channels is scaled up and the consumers' matching input channels down by the same factor, so the
float network computes the same function while the per-tensor activation grid of the consumers' input sees
channels of more equal range.

A pair is found from the dataflow of one forward pass and accepted only when random channel scales leave the
network's output unchanged on the example input (every forward gets its own copy of its input: some networks
scale theirs in place), so a residual branch, a channel split or a non-homogeneous
activation between the two never passes. It assumes per-output-channel weight grids: the producer's scaled
output channels then quantize exactly as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

from .dataflow import INPUT, trace_dataflow
from .seeding import seeded_generator

# A channel whose range on the calibration batches is below this fraction of the widest one's counts as dead
# and keeps factor 1: amplified, a channel that wakes up on other images would overrun the consumer's grid.
_DEAD_CHANNEL = 1e-3
# Largest output change (norm relative to the output's norm) that random channel scales may cause for a pair
# to count as exact: float32 rounding in another order stays about two orders of magnitude below it.
_INVARIANCE_TOLERANCE = 1e-5


@dataclass
class EqualizedPair:
    """One producer conv, the convs that consume its output, and the channel factors applied."""

    producer: str
    consumers: List[str]
    channels: int
    min_scale: float
    max_scale: float


def _producer_ok(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d


def _consumer_ok(module: nn.Module, channels: int) -> bool:
    return type(module) in (nn.Conv2d, nn.ConvTranspose2d) and module.in_channels == channels


def _input_channel_view(module: nn.Module, factors: torch.Tensor) -> torch.Tensor:
    """``factors`` (one per input channel) laid out to multiply ``module.weight`` element by element."""
    weight = module.weight
    if isinstance(module, nn.ConvTranspose2d):  # weight (in, out / groups, kh, kw)
        return factors.view(-1, *([1] * (weight.dim() - 1)))
    groups = module.groups
    out_per, in_per = weight.shape[0] // groups, weight.shape[1]
    index = (torch.arange(weight.shape[0]) // out_per)[:, None] * in_per + torch.arange(in_per)[None, :]
    return factors[index].view(weight.shape[0], in_per, *([1] * (weight.dim() - 2)))


@torch.no_grad()
def _apply(modules: Dict[str, nn.Module], producer: str, consumers: Sequence[str], factors: torch.Tensor) -> None:
    """Multiply ``producer``'s output channel ``c`` by ``factors[c]`` and divide its consumers' inputs by it."""
    conv = modules[producer]
    factors = factors.to(conv.weight)
    conv.weight.mul_(factors.view(-1, *([1] * (conv.weight.dim() - 1))))
    if conv.bias is not None:
        conv.bias.mul_(factors)
    for name in consumers:
        module = modules[name]
        module.weight.div_(_input_channel_view(module, factors))


def candidate_pairs(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, List[str]]]:
    """``(producer, consumers)`` where the dataflow of one pass says the consumers' inputs come from the producer
    alone through pass-through ops, each layer ran once, and the channel counts match."""
    trace = trace_dataflow(model, example)
    modules = dict(model.named_modules())
    consumers: Dict[str, List[str]] = {}
    for name in trace.order:
        inputs = trace.layer_inputs.get(name, [])
        if trace.layer_calls[name] != 1 or len(inputs) != 1:
            continue
        sources, direct = inputs[0].sources, inputs[0].direct
        if len(sources) == 1 and sources == direct and INPUT not in sources:
            consumers.setdefault(next(iter(sources)), []).append(name)
    pairs = []
    for producer, names in consumers.items():
        conv = modules.get(producer)
        if conv is None or not _producer_ok(conv) or trace.layer_calls[producer] != 1:
            continue
        if all(_consumer_ok(modules[name], conv.out_channels) for name in names):
            pairs.append((producer, names))
    return pairs


@torch.no_grad()
def _invariant(model: nn.Module, pairs: Sequence[Tuple[str, List[str]]], example: torch.Tensor,
               reference: torch.Tensor) -> bool:
    """Whether random factors in [0.5, 2] on every pair of ``pairs`` leave the output (``reference`` before)
    unchanged."""
    modules = dict(model.named_modules())
    names = {name for producer, consumers in pairs for name in [producer, *consumers]}
    saved = {name: [p.detach().clone() for p in modules[name].parameters(recurse=False)] for name in names}
    generator = seeded_generator(0, 'equalization check')
    try:
        for producer, consumers in pairs:
            channels = modules[producer].out_channels
            factors = 2.0 ** (torch.rand(channels, generator=generator, dtype=torch.float64) * 2 - 1)
            _apply(modules, producer, consumers, factors)
        output = model(example.clone())
    finally:
        for name, values in saved.items():
            for p, value in zip(modules[name].parameters(recurse=False), values):
                p.copy_(value)
    if not isinstance(output, torch.Tensor):
        return False
    change = float((output.double() - reference.double()).norm())
    return bool(torch.isfinite(output).all()) and change <= _INVARIANCE_TOLERANCE * max(
        float(reference.double().norm()), 1e-30)


def exact_pairs(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, List[str]]]:
    """The candidate pairs whose channel scaling leaves the network's output unchanged: all at once when they
    pass together, otherwise each one tried alone. None for a network whose output is not one finite tensor."""
    pairs = candidate_pairs(model, example)
    if not pairs:
        return pairs
    with torch.no_grad():
        reference = model(example.clone())
    if not isinstance(reference, torch.Tensor) or not bool(torch.isfinite(reference).all()):
        return []
    if _invariant(model, pairs, example, reference):
        return pairs
    return [pair for pair in pairs if _invariant(model, [pair], example, reference)]


@torch.no_grad()
def channel_ranges(model: nn.Module, pairs: Sequence[Tuple[str, List[str]]], batches: Iterable[torch.Tensor]
                   ) -> Dict[str, torch.Tensor]:
    """Per producer, the largest magnitude of each channel over its consumers' inputs on ``batches``."""
    modules = dict(model.named_modules())
    ranges: Dict[str, torch.Tensor] = {}

    def observe(producer: str):
        def hook(module, args):
            x = args[0].detach()
            current = x.abs().transpose(0, 1).reshape(x.shape[1], -1).amax(dim=1).double().cpu()
            ranges[producer] = torch.maximum(ranges[producer], current) if producer in ranges else current
        return hook

    handles = [modules[name].register_forward_pre_hook(observe(producer))
               for producer, consumers in pairs for name in consumers]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(batch.to(device, copy=True))
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def equalization_factors(ranges: torch.Tensor, strength: float) -> torch.Tensor:
    """Per channel ``(r_max / r_c) ** strength``: 1 for the widest channel, and with strength 1 every channel
    brought to the widest one's range; 1 for a dead channel (range below a thousandth of the widest)."""
    widest = float(ranges.max())
    if widest <= 0:
        return torch.ones_like(ranges)
    alive = ranges >= _DEAD_CHANNEL * widest
    return torch.where(alive, (widest / ranges.clamp(min=_DEAD_CHANNEL * widest)) ** strength,
                       torch.ones_like(ranges))


@torch.no_grad()
def equalize(model: nn.Module, batches: Sequence[torch.Tensor], example: torch.Tensor, strength: float
             ) -> List[EqualizedPair]:
    """Equalize ``model`` in place (see the module docstring); returns what was scaled."""
    was_training = model.training
    model.eval()
    try:
        pairs = exact_pairs(model, example)
        ranges = channel_ranges(model, pairs, batches)
        modules = dict(model.named_modules())
        done = []
        for producer, consumers in pairs:
            if producer not in ranges:
                continue
            factors = equalization_factors(ranges[producer], strength)
            _apply(modules, producer, consumers, factors)
            done.append(EqualizedPair(producer, list(consumers), factors.numel(), float(factors.min()),
                                      float(factors.max())))
        return done
    finally:
        model.train(was_training)
