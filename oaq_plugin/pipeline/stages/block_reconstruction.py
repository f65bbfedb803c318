"""Block reconstruction (BRECQ/QDrop-style), block by block after the search; beyond the paper.

The search and learned rounding fit each layer to its own float output, which misses how the errors of
the layers of a block add up (a concatenation, a shared block run several times, an attention multiply).
Here the network is cut into blocks of a few quantized layers (its modules, top-down: a module with at
most ``max_layers`` quantized layers is a block, a larger one is cut into its children), and each block in
execution order learns, on the inputs it sees with every earlier block quantized:

- the rounding of its layers' weights (the soft round-up/down choices of
  :mod:`.learned_rounding`, with the same annealed regulariser), and
- its activation quantizers' bounds and breakpoints,

so that the block's output matches the float block's output on float inputs. While it learns, each
activation quantizer passes a random half of its values unquantized (QDrop's ``drop_prob``), which keeps
the learned parameters from fitting the noise of one set of quantized inputs. The rounding is hardened
at the end, and the block keeps what it learned only when its output error on the captured data drops.

Four levers, each off by default (``ReconstructionConfig``): ``group_siblings`` cuts a run of chained
children (a flat ``nn.Sequential``) into multi-layer blocks named ``first..last``; ``weight_clips`` learns
the weight clips (step sizes) with the rounding; ``window`` trains a high-resolution block on random windows
of its inputs and compares the valid interior of its output; ``output_weight`` adds the network output's
error to the objective (NWQ-style).
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import AbstractSet, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...config import OAQConfig, ReconstructionConfig
from ...errors import NumericalError
from ...quant.activation import activation_quantizers, dropped_quantization, fast_fake_quantization
from ...quant.convert import modes_restored
from ...quant.forward_hooks import forward_hooks
from ...quant.layers import QuantLayer, quant_layers
from ...quant.region_grid import MIN_STEP
from ...quant.seeding import seeded_generator
from ..capture.layer_capture import StopForward, call_counts
from .base import (Record, Stage, StageContext, Unit, UnitReport, calibration_samples, only_trained,
                   unit_by_unit)
from .learned_rounding import beta_at, initial_variables, regulariser, soft_choice
from .search import relative_error

# One captured call of a block: its positional and keyword arguments, and its output.
Call = Tuple[Tuple[Any, ...], Dict[str, Any]]


# A block of several consecutive sibling modules is named '<first>..<last>' ('..' is in no module name).
GROUP_SEPARATOR = '..'


def reconstruction_blocks(qmodel: nn.Module, max_layers: int, example: Optional[torch.Tensor] = None) -> List[str]:
    """Names of the blocks, top-down: a module with at most ``max_layers`` quantized layers (or a quantized
    layer itself) is a block; a larger one is cut into its children. Modules without one are skipped.

    With ``example`` (sibling grouping), the children of a flat container that is cut (an ``nn.Sequential``
    with its own forward, or an ``nn.ModuleList``) are first traced on it: a run of consecutive children each
    called once on the previous one's output is grouped into blocks ``'<first>..<last>'`` of at most
    ``max_layers`` quantized layers, as even as the limit allows (a child too large for a block is still
    cut). Other modules are not grouped even where their children chain: their forward may also read an
    intermediate output (a concatenation of every block's output), which a group's objective would miss.
    """
    if isinstance(qmodel, QuantLayer):
        return ['']
    cut: List[Tuple[str, nn.Module]] = []

    def find_cut(prefix: str, module: nn.Module) -> None:
        cut.append((prefix, module))
        for name, child in module.named_children():
            full = f'{prefix}.{name}' if prefix else name
            if not isinstance(child, QuantLayer) and len(quant_layers(child)) > max_layers:
                find_cut(full, child)

    find_cut('', qmodel)
    flat = [(prefix, module) for prefix, module in cut if _is_flat(module)]
    chained = _chained_siblings(qmodel, flat, example) if example is not None and flat else {}
    blocks: List[str] = []
    for prefix, module in cut:
        children = [(f'{prefix}.{name}' if prefix else name, child) for name, child in module.named_children()]
        counts = [len(quant_layers(child)) for _, child in children]
        links = chained.get(prefix, [False] * max(len(children) - 1, 0))
        run: List[int] = []
        for index in range(len(children)):
            run.append(index)
            if index + 1 < len(children) and links[index]:
                continue
            blocks.extend(_group_run([(children[i][0], counts[i]) for i in run], max_layers))
            run = []
    # Blocks in the order the structure lists them: parents are visited before their children.
    order = {name: i for i, (name, _) in enumerate(qmodel.named_modules())}
    return sorted(blocks, key=lambda name: order[name.split(GROUP_SEPARATOR)[0]])


def _is_flat(module: nn.Module) -> bool:
    """Whether ``module`` is a container whose children only feed one another in turn when they chain."""
    return isinstance(module, nn.ModuleList) or \
        (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward)


def _group_run(children: Sequence[Tuple[str, int]], max_layers: int) -> List[str]:
    """The blocks of a run of chained children (``(name, quantized layers)``, a single child being a run of
    one): segments between children too large for a block are cut as evenly as ``max_layers`` allows."""
    blocks: List[str] = []
    segment: List[Tuple[str, int]] = []

    def close_segment() -> None:
        total = sum(count for _, count in segment)
        if total:
            target = math.ceil(total / math.ceil(total / max_layers))
            group: List[Tuple[str, int]] = []
            for name, count in segment:
                filled = sum(c for _, c in group)
                if filled and count and filled + count > target:
                    blocks.append(_group_name(group))
                    group = []
                group.append((name, count))
            blocks.append(_group_name(group))
        segment.clear()

    for name, count in children:
        if count > max_layers:
            close_segment()
            # Parents precede children in the traversal, so the child's own blocks are added when it is
            # reached as a cut module.
            continue
        segment.append((name, count))
    close_segment()
    return blocks


def _group_name(group: Sequence[Tuple[str, int]]) -> str:
    counts = dict(group)
    members = [name for name, _ in group]
    # A group of one layer-holding child is that child, named as without grouping. Otherwise leading
    # children without layers are dropped (nothing to learn before the first layer), trailing ones kept:
    # the block's output is then the activation the next block reads.
    if sum(1 for name in members if counts[name]) == 1:
        return next(name for name in members if counts[name])
    while counts[members[0]] == 0:
        members.pop(0)
    return f'{members[0]}{GROUP_SEPARATOR}{members[-1]}'


def _chained_siblings(qmodel: nn.Module, cut: Sequence[Tuple[str, nn.Module]],
                      example: torch.Tensor) -> Dict[str, List[bool]]:
    """Per cut module, for each pair of consecutive children, whether the second is called (once) on exactly
    the output of the first (called once), as traced on ``example``."""
    calls: Dict[str, List[Any]] = {}
    children = {prefix: [f'{prefix}.{name}' if prefix else name for name, _ in module.named_children()]
                for prefix, module in cut}
    modules = dict(qmodel.named_modules())
    watched = [(name, modules[name]) for names in children.values() for name in names]

    def before(name: str, module: nn.Module, args, kwargs) -> None:
        single = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        calls.setdefault(name, []).append({'input': args[0].detach().clone() if single else None})

    def after(name: str, module: nn.Module, args, output) -> None:
        calls[name][-1]['output'] = output.detach().clone() if isinstance(output, torch.Tensor) else None

    with forward_hooks(watched, before, pre=True, with_kwargs=True), forward_hooks(watched, after), \
            torch.no_grad():
        qmodel(example)

    def linked(first: str, second: str) -> bool:
        a, b = calls.get(first, []), calls.get(second, [])
        if len(a) != 1 or len(b) != 1 or a[0].get('output') is None or b[0]['input'] is None:
            return False
        return a[0]['output'].shape == b[0]['input'].shape and torch.equal(a[0]['output'], b[0]['input'])
    return {prefix: [linked(x, y) for x, y in zip(names, names[1:])] for prefix, names in children.items()}


def block_members(qmodel: nn.Module, name: str) -> List[nn.Module]:
    """The modules of block ``name``: the module itself, or the siblings ``first`` to ``last`` of a group."""
    modules = dict(qmodel.named_modules())
    if GROUP_SEPARATOR not in name:
        return [modules[name]]
    first, last = name.split(GROUP_SEPARATOR)
    parent, _, first_child = first.rpartition('.')
    siblings = list(modules[parent].named_children())
    names = [child for child, _ in siblings]
    start, stop = names.index(first_child), names.index(last.rpartition('.')[2])
    return [module for _, module in siblings[start:stop + 1]]


def block_module(qmodel: nn.Module, name: str) -> nn.Module:
    """Block ``name`` as one module: the module itself, or its group's members chained in a ``Sequential``
    (sharing their parameters with ``qmodel``)."""
    members = block_members(qmodel, name)
    return members[0] if len(members) == 1 and GROUP_SEPARATOR not in name else nn.Sequential(*members)


def block_order(qmodel: nn.Module, blocks: Sequence[str], example: torch.Tensor) -> Tuple[List[str], Dict[str, int]]:
    """The blocks that run on ``example``, in the order they first run, and how many times each runs."""
    counts = call_counts(qmodel, example, [(name, block_members(qmodel, name)[0]) for name in blocks])
    return list(counts), counts


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _cat(parts: Sequence[Any], sizes: Sequence[int]) -> Any:
    """Concatenate captured chunks of ``sizes`` samples along the sample axis: tensors whose first axis is
    the chunk's samples; other values (a mask shared by every sample, a size) are taken from the first."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        batched = all(p.dim() > 0 and p.shape[0] == n for p, n in zip(parts, sizes))
        return torch.cat(list(parts)) if batched else first
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([p[i] for p in parts], sizes) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts], sizes) for k in first}
    return first


def _select(value: Any, picks: torch.Tensor, count: int, device: torch.device) -> Any:
    """The samples ``picks`` of every tensor whose first axis is the ``count`` samples, moved to ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == count:
            value = value[picks]
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_select(v, picks, count, device) for v in value)
    if isinstance(value, dict):
        return {k: _select(v, picks, count, device) for k, v in value.items()}
    return value


def _tensors(value: Any) -> List[torch.Tensor]:
    """The floating-point tensors of a block output, flattened."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def capture_block(qmodel: nn.Module, block: str, samples: torch.Tensor, calls: int, outputs: bool,
                  chunk: int = 4) -> Tuple[List[Call], List[Any]]:
    """Every call's arguments (and, with ``outputs``, outputs) of module ``block`` on ``samples``.

    Runs ``qmodel`` in chunks of samples with the layers' modes as the caller set them, and stops each
    forward once the block has run its ``calls`` calls. A group of siblings (``'<first>..<last>'``) takes
    its arguments from its first member and its outputs from its last.
    """
    members = block_members(qmodel, block)
    sizes = [int(samples[start:start + chunk].shape[0]) for start in range(0, samples.shape[0], chunk)]
    arguments: List[List[Call]] = [[] for _ in range(calls)]
    results: List[List[Any]] = [[] for _ in range(calls)]
    seen = [0]

    def record(name: str, mod: nn.Module, args, kwargs, output) -> None:
        index = seen[0]
        if index < calls:
            arguments[index].append((_to_cpu(args), _to_cpu(kwargs)))
            if outputs:
                results[index].append(_to_cpu(output))
        seen[0] += 1
        if seen[0] >= calls:
            raise StopForward

    entered = [0]

    def enter(name: str, mod: nn.Module, args, kwargs) -> None:
        # Copies: a later member may change its input in place (an in-place activation).
        if entered[0] < calls:
            arguments[entered[0]].append((_clone(_to_cpu(args)), _clone(_to_cpu(kwargs))))
        entered[0] += 1

    def leave(name: str, mod: nn.Module, args, output) -> None:
        if seen[0] < calls and outputs:
            results[seen[0]].append(_clone(_to_cpu(output)))
        seen[0] += 1
        if seen[0] >= calls:
            raise StopForward

    if len(members) == 1 and GROUP_SEPARATOR not in block:
        hooks = forward_hooks([(block, members[0])], record, with_kwargs=True)
    else:
        hooks = contextlib.ExitStack()
        hooks.enter_context(forward_hooks([(block, members[0])], enter, pre=True, with_kwargs=True))
        hooks.enter_context(forward_hooks([(block, members[-1])], leave))
    device = next(qmodel.parameters()).device
    with hooks, torch.no_grad():
        for start in range(0, samples.shape[0], chunk):
            seen[0] = entered[0] = 0
            try:
                qmodel(samples[start:start + chunk].to(device))
            except StopForward:
                pass
    merged_calls = [(_cat([a for a, _ in parts], sizes), _cat([k for _, k in parts], sizes)) for parts in arguments]
    merged_outputs = [_cat(parts, sizes) for parts in results] if outputs else []
    return merged_calls, merged_outputs


@dataclass
class BlockReconstruction(Record):
    """Output error of one block before and after reconstruction, and what was kept."""

    name: str
    layers: int
    calls: int
    error_before: float
    error_after: float
    output_energy: float
    kept: bool
    seconds: float
    window: int = 0  # side of the input windows it trained on; 0: whole inputs
    # The network output's error relative to its energy (the output term; 0 without it).
    output_error_before: float = 0.0
    output_error_after: float = 0.0

    @property
    def reduction(self) -> float:
        """Fraction of the block's output error removed (0 when nothing was kept)."""
        if not self.kept or self.error_before <= 0:
            return 0.0
        return 1.0 - self.error_after / self.error_before

    def derived(self) -> dict:
        return {'error_reduction': self.reduction}


@dataclass
class ReconstructionReport(UnitReport):
    """Per block, what reconstruction changed; and how long it took."""

    ENTRIES = 'blocks'

    blocks: List[BlockReconstruction] = field(default_factory=list)
    seconds: float = 0.0

    def derived(self) -> dict:
        before = sum(relative_error(b.error_before, b.output_energy) for b in self.blocks)
        after = sum(relative_error(b.error_after if b.kept else b.error_before, b.output_energy)
                    for b in self.blocks)
        return {'relative_error_before': before, 'relative_error_after': after}

    def summary(self) -> str:
        lines = [f"{'block':32s} {'layers':>6s} {'err before':>12s} {'err after':>12s} {'kept':>5s} {'s':>7s}"]
        for b in self.blocks:
            lines.append(f'{b.name[:32]:32s} {b.layers:6d} {b.error_before:12.4g} {b.error_after:12.4g} '
                         f'{"yes" if b.kept else "no":>5s} {b.seconds:7.1f}')
        kept = sum(b.kept for b in self.blocks)
        lines.append(f'block reconstruction: kept in {kept} of {len(self.blocks)} blocks, {self.seconds:.1f} s')
        return '\n'.join(lines)


class _SoftRounding:
    """The soft rounding variables of one layer, and the soft quantized weight they give.

    With ``learn_clip`` the grid follows the quantizer's clip as it trains: each weight's floor is taken on
    the current grid, so the hardened weight is exactly what the quantizer computes from the final clip and
    the 0/1 choices; the clip learns through the step (LSQ's gradient: ``code - zero_point`` per weight).
    """

    def __init__(self, layer: QuantLayer, learn_clip: bool = False) -> None:
        quantizer = layer.weight_quantizer
        self.quantizer = quantizer
        self.learn_clip = learn_clip
        self.float_weight = layer.weight.detach()
        with torch.no_grad():
            clip = torch.clamp(quantizer.clip.detach(), min=MIN_STEP)
            self.step = quantizer.step(clip)
            self.position = quantizer.grid_position(self.float_weight, clip)
            self.floor = torch.floor(self.position)
        self.variables = nn.Parameter(initial_variables(self.position - self.floor))

    def choice(self) -> torch.Tensor:
        return soft_choice(self.variables)

    def weight(self) -> torch.Tensor:
        top = self.quantizer.num_levels - 1
        step, floor = self.step, self.floor
        if self.learn_clip:
            clip = self.quantizer.effective_clip(self.quantizer.clip)
            step = self.quantizer.step(clip)
            floor = torch.floor(self.quantizer.grid_position(self.float_weight, clip.detach()))
        return (torch.clamp(floor + self.choice(), 0, top) - self.quantizer.zero_point) * step

    def flags(self) -> torch.Tensor:
        return (self.choice() >= 0.5).to(torch.uint8)


@contextlib.contextmanager
def _soft_weights(layers: Sequence[QuantLayer], soft: Sequence['_SoftRounding']) -> Iterator[None]:
    """While active, each of ``layers`` computes with its soft-rounded weight (through its executor)."""
    previous = [layer.executor for layer in layers]

    def executor(s: '_SoftRounding', layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.float_op(layer.act_quantizer(x), s.weight())
    for layer, s in zip(layers, soft):
        layer.executor = functools.partial(executor, s)
    try:
        yield
    finally:
        for layer, executor_before in zip(layers, previous):
            layer.executor = executor_before


def _block_error(block: nn.Module, calls: Sequence[Call], targets: Sequence[Any], device: torch.device,
                 chunk: int = 4) -> float:
    """Mean squared error of the block's outputs on the captured calls, over every output tensor."""
    total, count = 0.0, 0
    with torch.no_grad():
        for (args, kwargs), target in zip(calls, targets):
            samples = _tensors(target)[0].shape[0]
            for start in range(0, samples, chunk):
                picks = torch.arange(start, min(start + chunk, samples))
                out = block(*_select(args, picks, samples, device), **_select(kwargs, picks, samples, device))
                for o, t in zip(_tensors(out), _tensors(_select(target, picks, samples, device))):
                    total += float((o.float() - t).pow(2).sum())
                    count += t.numel()
    return total / max(count, 1)


def _energy(targets: Sequence[Any]) -> float:
    values = [t for target in targets for t in _tensors(target)]
    return float(sum(t.pow(2).sum() for t in values) / max(sum(t.numel() for t in values), 1))


# A window's output must match the whole input's output to this fraction of the output's largest value
# (float convolutions of a crop and of the whole map differ in their last bits only).
WINDOW_TOLERANCE = 1e-4
WINDOW_PROBES = 4


@dataclass
class _Windows:
    """How a high-resolution block trains on windows: the input window's side, the output's scale
    ``num / den`` to the input, and the margin of output pixels the window does not determine."""

    side: int
    num: int
    den: int
    margin: int

    @property
    def out_side(self) -> int:
        return self.side * self.num // self.den

    def draw(self, x: torch.Tensor, target: torch.Tensor,
             generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """A random window of each sample of ``x``, and the valid interior of the matching ``target`` window."""
        inputs, targets = [], []
        out, margin = self.out_side, self.margin
        for sample, wanted in zip(x, target):
            top, left = (self.den * int(torch.randint(0, (size - self.side) // self.den + 1, (1,), generator=generator))
                         for size in x.shape[-2:])
            inputs.append(sample[..., top:top + self.side, left:left + self.side])
            top, left = top * self.num // self.den, left * self.num // self.den
            targets.append(wanted[..., top + margin:top + out - margin, left + margin:left + out - margin])
        return torch.stack(inputs), torch.stack(targets)

    def interior(self, output: torch.Tensor) -> torch.Tensor:
        return output[..., self.margin:self.out_side - self.margin, self.margin:self.out_side - self.margin]


def _plan_windows(block: nn.Module, calls: Sequence[Call], targets: Sequence[Any], side: int,
                  network_size: Optional[Sequence[int]], generator: torch.Generator,
                  device: torch.device) -> Optional[_Windows]:
    """Windows for ``block`` when its every call takes one 4-D input and gives one 4-D output at a rational
    scale of it, the input or the output being larger than the network input (``network_size``, height and
    width: an upsampler, a block at high resolution), and a window of ``side`` leaves at least half its
    output side valid; ``None`` (whole inputs) otherwise."""
    if side <= 0 or network_size is None:
        return None
    shapes = []
    for (args, kwargs), target in zip(calls, targets):
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4 or \
                not isinstance(target, torch.Tensor) or target.dim() != 4:
            return None
        shapes.append((tuple(args[0].shape[-2:]), tuple(target.shape[-2:])))
    (height, width), (out_height, out_width) = shapes[0]
    scale = Fraction(out_height, height)
    if any(s != shapes[0] for s in shapes) or Fraction(out_width, width) != scale or \
            max(height * width, out_height * out_width) <= network_size[0] * network_size[1]:
        return None
    side = side - side % scale.denominator
    if side < scale.denominator or side >= min(height, width):
        return None
    windows = _Windows(side, scale.numerator, scale.denominator, 0)
    # The margin is measured, not derived from kernel sizes: it covers padding, strides, upsampling and any
    # op whose reach is wider (a block with global pooling leaves no valid interior and trains whole).
    layers = [layer for _, layer in quant_layers(block)]
    modes = [layer.mode for layer in layers]
    x = calls[0][0][0]
    margin = 0
    try:
        for layer in layers:
            layer.set_mode('float')
        with torch.no_grad():
            for index in range(min(WINDOW_PROBES, x.shape[0])):
                sample = x[index:index + 1].to(device)
                whole = block(sample)
                crop, expected = windows.draw(sample, whole, generator)
                got = block(crop)
                tolerance = WINDOW_TOLERANCE * max(float(whole.abs().max()), MIN_STEP)
                bad = ((got - expected).abs().amax(dim=(0, 1)) > tolerance).nonzero()
                if bad.numel():
                    out = windows.out_side
                    depth = torch.minimum(torch.minimum(bad[:, 0], bad[:, 1]),
                                          torch.minimum(out - 1 - bad[:, 0], out - 1 - bad[:, 1]))
                    margin = max(margin, int(depth.max()) + 1)
    finally:
        for layer, mode in zip(layers, modes):
            layer.set_mode(mode)
    if windows.out_side - 2 * margin < windows.out_side // 2:
        return None
    windows.margin = margin
    return windows


@dataclass
class NetworkTerm:
    """The network-output term of a block's objective (``output_weight``).

    Attributes:
        model: The whole network, its layers' modes as the block's reconstruction needs them (earlier
            blocks quantized, later ones float); the block is one of its modules.
        inputs: The network inputs, sample for sample those of the block's captured calls.
        targets: The float network's outputs on them.
    """

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        self.energy = _energy([self.targets])

    def error(self, picks: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = self.model(self.inputs[picks].to(device))
        return relative_error((out - self.targets[picks].to(device)).pow(2).mean(), self.energy)

    def total_error(self, device: torch.device, chunk: int = 4) -> float:
        """The relative output error on every sample."""
        total = 0.0
        with torch.no_grad():
            for start in range(0, self.inputs.shape[0], chunk):
                picks = torch.arange(start, min(start + chunk, self.inputs.shape[0]))
                total += float(self.error(picks, device)) * len(picks)
        return total / self.inputs.shape[0]


def reconstruct_block(name: str, block: nn.Module, calls: Sequence[Call], targets: Sequence[Any],
                      settings: ReconstructionConfig, network_size: Optional[Sequence[int]] = None,
                      network: Optional[NetworkTerm] = None) -> BlockReconstruction:
    """Learn the weight rounding and activation quantizers of ``block`` so its outputs on ``calls``
    (its inputs in the partly quantized network) match ``targets`` (the float block's outputs).

    ``network_size`` (the network input's height and width) lets a block whose inputs are larger train on
    windows of them (``settings.window``). With ``network`` and ``settings.output_weight`` the objective
    also holds the network's output error, and the block is kept when the sum of both drops.
    """
    start = time.perf_counter()
    device = next(block.parameters()).device
    layers = [layer for _, layer in quant_layers(block)]
    quantizers = activation_quantizers(block)
    for layer in layers:
        layer.set_mode('quant')
    # Rounding flags are buffers of the state: loading it back restores them (or rounding to nearest).
    before = {k: v.detach().clone() for k, v in block.state_dict().items()}
    energy = _energy(targets)
    # The block's errors (and the quantized inputs of later blocks) go through the fast fake quantization
    # too: the same values up to float rounding, without the reference's per-region selections.
    with fast_fake_quantization(block):
        error_before = _block_error(block, calls, targets, device)
    if settings.output_weight <= 0:
        network = None
    output_before = network.total_error(device) if network is not None else 0.0

    soft = [_SoftRounding(layer, settings.weight_clips) for layer in layers] if settings.rounding else []
    groups = []
    if soft:
        for layer in layers:
            layer.weight_quantizer.set_rounding(None)
        groups.append({'params': [s.variables for s in soft], 'lr': settings.lr})
    if settings.weight_clips:
        for layer in layers:
            clip = layer.weight_quantizer.clip
            scale = max(float(clip.detach().abs().max()), MIN_STEP)
            groups.append({'params': [clip], 'lr': settings.weight_lr * scale})
    if settings.activations:
        for _, quantizer in quantizers:
            if quantizer.bits > settings.activation_bits:
                continue
            for parameter in quantizer.parameters(recurse=False):
                scale = max(float(parameter.detach().abs().max()), MIN_STEP)
                groups.append({'params': [parameter], 'lr': settings.act_lr * scale})
    generator = seeded_generator(settings.seed, name)
    samples = _tensors(targets[0])[0].shape[0]
    batch = min(settings.batch_size, samples)
    windows = _plan_windows(block, calls, targets, settings.window, network_size,
                            seeded_generator(settings.seed, f'{name}/windows'), device) if groups else None
    if groups:
        optimizer = torch.optim.Adam(groups)
        trained = [p for g in groups for p in g['params']]
        requires = [p.requires_grad for p in trained]
        for p in trained:
            p.requires_grad_(True)
        try:
            with _soft_weights(layers, soft), fast_fake_quantization(block), \
                    dropped_quantization(quantizers, settings.drop_prob, generator), torch.enable_grad(), \
                    (only_trained(network.model, trained) if network is not None else contextlib.nullcontext()):
                for iteration in range(settings.iterations):
                    picks = torch.randperm(samples, generator=generator)[:batch]
                    loss = 0.0
                    for (args, kwargs), target in zip(calls, targets):
                        if windows is not None:
                            x, t = windows.draw(args[0][picks], target[picks], generator)
                            o = windows.interior(block(x.to(device)))
                            loss = loss + relative_error((o - t.to(device)).pow(2).mean(), energy)
                            continue
                        out = block(*_select(args, picks, samples, device), **_select(kwargs, picks, samples, device))
                        for o, t in zip(_tensors(out), _tensors(_select(target, picks, samples, device))):
                            loss = loss + relative_error((o - t).pow(2).mean(), energy)
                    if network is not None:
                        loss = loss + settings.output_weight * network.error(picks, device)
                    beta = beta_at(iteration, settings.iterations, settings.warmup)
                    if soft and beta is not None:
                        loss = loss + settings.reg_weight * sum(regulariser(s.choice(), beta) for s in soft) / len(soft)
                    if not torch.isfinite(loss):
                        raise NumericalError(f"block reconstruction produced NaN/Inf in block '{name}' at iteration "
                                             f'{iteration}; lower reconstruction.lr or reconstruction.act_lr')
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            for p, r in zip(trained, requires):
                p.requires_grad_(r)
                p.grad = None
        with torch.no_grad():
            for layer, s in zip(layers, soft):
                layer.weight_quantizer.set_rounding(s.flags())
    with fast_fake_quantization(block):
        error_after = _block_error(block, calls, targets, device)
    kept = error_after < error_before
    output_after = output_before
    if network is not None:
        output_after = network.total_error(device)
        weight = settings.output_weight
        kept = relative_error(error_after, energy) + weight * output_after < \
            relative_error(error_before, energy) + weight * output_before
    if not kept:
        block.load_state_dict(before)
    return BlockReconstruction(name=name or '(model)', layers=len(layers), calls=len(calls),
                               error_before=error_before, error_after=error_after, output_energy=energy,
                               kept=bool(kept), seconds=time.perf_counter() - start,
                               window=windows.side if windows is not None else 0,
                               output_error_before=output_before, output_error_after=output_after)


class ReconstructionStage(Stage):
    """Block reconstruction, block by block in execution order; resumable before any block."""

    name = 'reconstruction'
    report_type = ReconstructionReport

    def run(self, context: StageContext) -> ReconstructionReport:
        qmodel = context.qmodel
        settings = context.config.reconstruction
        samples = calibration_samples(context.batches, settings.num_samples, 'block reconstruction')
        if samples.dim() == 4:
            samples = samples[..., :settings.patch_size, :settings.patch_size]

        def units(finished: AbstractSet[str]) -> Tuple[int, Iterator[Unit]]:
            device = next(qmodel.parameters()).device
            example = samples[:1].to(device)
            with modes_restored(qmodel):
                for _, layer in quant_layers(qmodel):
                    layer.set_mode('float')
                candidates = reconstruction_blocks(qmodel, settings.max_layers,
                                                   example if settings.group_siblings else None)
                names, counts = block_order(qmodel, candidates, example)

            def pending() -> Iterator[Unit]:
                with modes_restored(qmodel):
                    for index, name in enumerate(names):
                        if (name or '(model)') not in finished:
                            yield name, functools.partial(_reconstruct_in_place, qmodel, names, index, counts[name],
                                                          samples, settings)
            return len(names), pending()
        return unit_by_unit(context, ReconstructionReport(), units, desc='reconstruction', unit='block')


def _reconstruct_in_place(qmodel: nn.Module, names: Sequence[str], index: int, calls: int, samples: torch.Tensor,
                          settings: ReconstructionConfig) -> BlockReconstruction:
    """Reconstruct block ``names[index]`` of ``qmodel`` on its float outputs and on its inputs with the
    blocks before it quantized."""
    name = names[index]
    for _, layer in quant_layers(qmodel):
        layer.set_mode('float')
    _, targets = capture_block(qmodel, name, samples, calls, outputs=True)
    for earlier in names[:index]:
        for _, layer in quant_layers(block_module(qmodel, earlier)):
            layer.set_mode('quant')
    with fast_fake_quantization(qmodel):
        inputs, _ = capture_block(qmodel, name, samples, calls, outputs=False)
    network = None
    if settings.output_weight > 0:
        # Float outputs of the whole network; the modes are then what the block's objective needs.
        with modes_restored(qmodel):
            for _, layer in quant_layers(qmodel):
                layer.set_mode('float')
            with torch.no_grad():
                device = next(qmodel.parameters()).device
                outputs = [qmodel(samples[i:i + 4].to(device)) for i in range(0, samples.shape[0], 4)]
        # A network with several outputs (or none a tensor) has no single output term.
        if all(isinstance(out, torch.Tensor) for out in outputs):
            network = NetworkTerm(qmodel, samples, torch.cat(outputs).float().cpu())
    return reconstruct_block(name, block_module(qmodel, name), inputs, targets, settings,
                             network_size=tuple(samples.shape[-2:]), network=network)


def reconstruct_blocks(qmodel: nn.Module, batches: Sequence[torch.Tensor], config: OAQConfig,
                       progress: bool = False) -> ReconstructionReport:
    """Reconstruct every block of ``qmodel`` in place, in execution order, each on the inputs it sees
    with every earlier block quantized.

    Args:
        qmodel: A converted, calibrated (and usually searched) model.
        batches: The calibration batches; the first ``config.reconstruction.num_samples`` samples are used,
            cut to their top-left ``patch_size`` square.
        config: The method's configuration (``config.reconstruction``).
        progress: Show a progress bar over the blocks.
    """
    return ReconstructionStage().run(StageContext(qmodel=qmodel, batches=batches, config=config, progress=progress))
