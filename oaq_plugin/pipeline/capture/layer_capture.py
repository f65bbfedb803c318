"""Layer inputs captured with forward hooks, cut to small seeded windows so memory stays bounded.

The search stage needs, for every quantized layer, some of its real inputs: a full 96x96 feature map
of 64 channels for each of 8 samples and 50 layers would be about 1 GB, while a window of 32x32 per
sample carries the same value distribution at a ninth of the cost. Windows are drawn per layer from a
seeded generator, so a float pass and a partly quantized pass cut the same windows.
"""
from __future__ import annotations

from typing import AbstractSet, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ...errors import NumericalError
from ...quant.convert import modes_restored, set_mode
from ...quant.forward_hooks import forward_hooks
from ...quant.layers import QuantLayer, quant_layers
from ...quant.observer import all_finite
from ...quant.seeding import seeded_generator


class StopForward(Exception):
    """Raised from a hook once everything wanted has been captured, to skip the rest of the network."""


def execution_order(qmodel: nn.Module, example: torch.Tensor) -> List[str]:
    """Names of the quantized layers in the order they first run on ``example``."""
    return list(call_counts(qmodel, example))


def takes_tokens(layer: QuantLayer) -> bool:
    """Whether the layer reads its input as rows of features (Linear), whatever the input's rank."""
    return isinstance(layer.module, nn.Linear)


def call_counts(qmodel: nn.Module, example: torch.Tensor,
                modules: Optional[Sequence[Tuple[str, nn.Module]]] = None) -> Dict[str, int]:
    """How many times each of ``modules`` (``(name, module)``; default: the quantized layers) runs in one
    forward of ``example`` (shared ones run more), keyed in the order they first run; those that do not
    run are left out."""
    counts: Dict[str, int] = {}

    def count(name: str, module: nn.Module, args) -> None:
        counts[name] = counts.get(name, 0) + 1
    with forward_hooks(quant_layers(qmodel) if modules is None else modules, count, pre=True), torch.no_grad():
        qmodel(example)
    return counts


def cut_window(x: torch.Tensor, size: int, generator: torch.Generator, tokens: bool = False) -> torch.Tensor:
    """A random ``size`` x ``size`` spatial window per sample of an (N, C, H, W) input.

    Token inputs (``tokens``, or any input that is not 4-D) are flattened to rows of their last dimension
    and ``size * size`` rows per sample are kept at random.
    """
    if x.dim() == 4 and not tokens:
        height, width = x.shape[-2:]
        h, w = min(size, height), min(size, width)
        windows = []
        for sample in x:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            windows.append(sample[:, top:top + h, left:left + w])
        return torch.stack(windows).contiguous()
    rows = x.reshape(-1, x.shape[-1])
    keep = min(rows.shape[0], size * size * max(1, x.shape[0]))
    picks = torch.randperm(rows.shape[0], generator=generator)[:keep]
    return rows[picks].contiguous()


def capture_windows(qmodel: nn.Module, inputs: torch.Tensor, names: Sequence[str], window: int, seed: int,
                    chunk: int = 4, calls: Optional[Mapping[str, int]] = None) -> Dict[str, torch.Tensor]:
    """Run ``qmodel`` on ``inputs`` (in chunks) and keep a window of each named layer's input.

    A layer that runs several times a forward (a block shared along a cascade) gives windows of every
    call, since its quantizers serve them all; ``calls`` (from :func:`call_counts`, measured here when not
    given) says how many. The layers' modes are left as the caller set them (float, quant), so the same call
    captures float inputs or the inputs of a partly quantized network. The forward pass stops once every
    named layer has run all its calls on the last chunk.
    """
    wanted = set(names)
    layers = {name: layer for name, layer in quant_layers(qmodel) if name in wanted}
    missing = wanted - set(layers)
    if missing:
        raise KeyError(f'no quantized layer named {sorted(missing)[0]!r}')
    pieces: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}
    # Seeded by name, so that a capture of one layer cuts the same windows as a capture of many.
    generators = {name: seeded_generator(seed, name) for name in layers}
    if calls is None:
        calls = call_counts(qmodel, inputs[:1].to(next(iter(layers.values())).weight.device))
    expected = {name: max(1, calls.get(name, 1)) for name in layers}
    pending: Dict[str, int] = {}

    def capture(name: str, module: QuantLayer, args) -> None:
        x = args[0].detach()
        if not all_finite(x):
            raise NumericalError(f"non-finite values (NaN/Inf) in the input of layer '{name}' during the "
                                 'search; check the calibration inputs and the quantizer parameters')
        if pending.get(name, 0) > 0:
            pieces[name].append(cut_window(x, window, generators[name], takes_tokens(module)).float().cpu())
            pending[name] -= 1
            if not any(pending.values()):
                raise StopForward

    device = next(iter(layers.values())).weight.device
    with forward_hooks(layers.items(), capture, pre=True), torch.no_grad():
        for start in range(0, inputs.shape[0], chunk):
            pending.update(expected)
            try:
                qmodel(inputs[start:start + chunk].to(device))
            except StopForward:
                pass
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def window_bytes(qmodel: nn.Module, example: torch.Tensor, names: Sequence[str], window: int,
                 num_samples: int) -> Dict[str, int]:
    """Bytes the captured windows of each layer take for ``num_samples`` samples, over all its calls."""
    sizes: Dict[str, int] = {}

    def measure(name: str, module: QuantLayer, args) -> None:
        x = args[0]
        if x.dim() == 4 and not takes_tokens(module):
            per_sample = x.shape[1] * min(window, x.shape[-2]) * min(window, x.shape[-1])
        else:
            per_sample = window * window * x.shape[-1]
        sizes[name] = sizes.get(name, 0) + per_sample * num_samples * 4
    wanted = [(name, layer) for name, layer in quant_layers(qmodel) if name in names]
    with forward_hooks(wanted, measure, pre=True), torch.no_grad():
        qmodel(example)
    return sizes


def split_by_budget(names: Sequence[str], sizes: Dict[str, int], budget: int) -> List[List[str]]:
    """Consecutive groups of layers whose captures fit in ``budget`` bytes (at least one layer a group)."""
    groups: List[List[str]] = []
    current: List[str] = []
    used = 0
    for name in names:
        size = sizes.get(name, 0)
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def first_samples(batches: Sequence[torch.Tensor], count: int) -> Optional[torch.Tensor]:
    """The first ``count`` samples of the batches (fewer when the batches hold fewer)."""
    samples: List[torch.Tensor] = []
    for batch in batches:
        for sample in batch:
            if len(samples) == count:
                break
            samples.append(sample)
    if not samples:
        return None
    size = min(min(s.shape[-2:]) for s in samples) if samples[0].dim() == 3 else None
    if size is not None:
        samples = [s[..., :size, :size] for s in samples]
    return torch.stack(samples)


def layer_input_windows(qmodel: nn.Module, samples: torch.Tensor, names: Sequence[str], window: int, seed: int,
                        sequential: bool, memory_mb: int, skip: AbstractSet[str] = frozenset()
                        ) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, inputs, float_inputs)`` for each named layer in turn, in the order of ``names``.

    ``float_inputs`` are windows of the layer's input in the float network. ``inputs`` are the same windows
    as the network being built sees them: with ``sequential``, every earlier layer of ``names`` runs
    quantized (so the consumer's changes to them are seen); otherwise they are the float inputs. Float
    captures are made for groups of layers that fit ``memory_mb``; layers in ``skip`` are passed over.
    The layers' modes are restored when the iteration ends; close the iterator (``contextlib.closing``)
    if the consumer may stop early.
    """
    example = samples[:1].to(next(qmodel.parameters()).device)
    calls = call_counts(qmodel, example)
    sizes = window_bytes(qmodel, example, names, window, int(samples.shape[0]))
    budget = memory_mb * 2 ** 20 // (2 if sequential else 1)
    layers = dict(quant_layers(qmodel))
    with modes_restored(qmodel):
        for group in split_by_budget(names, sizes, budget):
            pending = [name for name in group if name not in skip]
            if not pending:
                continue
            set_mode(qmodel, 'float')
            float_inputs = capture_windows(qmodel, samples, pending, window, seed, calls=calls)
            for name in pending:
                if sequential:
                    for earlier in names[:names.index(name)]:
                        layers[earlier].set_mode('quant')
                    inputs = capture_windows(qmodel, samples, [name], window, seed, calls=calls)[name]
                else:
                    inputs = float_inputs[name]
                yield name, inputs, float_inputs.pop(name)
