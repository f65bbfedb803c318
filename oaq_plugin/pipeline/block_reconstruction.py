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
"""
from __future__ import annotations

import contextlib
import time
import types
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..config import OAQConfig, ReconstructionConfig
from ..errors import DataError, NumericalError
from ..quant.activation import activation_quantizers
from ..quant.convert import modes_restored
from ..quant.layers import QuantLayer, quant_layers
from ..quant.region_grid import MIN_STEP
from .layer_capture import StopForward, call_counts, first_samples
from .learned_rounding import beta_at, initial_variables, regulariser, soft_choice
from .search import relative_error
from .training_fake_quant import fast_fake_quantization

# One captured call of a block: its positional and keyword arguments, and its output.
Call = Tuple[Tuple[Any, ...], Dict[str, Any]]


def reconstruction_blocks(qmodel: nn.Module, max_layers: int) -> List[str]:
    """Names of the blocks, top-down: a module with at most ``max_layers`` quantized layers (or a quantized
    layer itself) is a block; a larger one is cut into its children. Modules without one are skipped."""
    blocks: List[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f'{prefix}.{name}' if prefix else name
            count = len(quant_layers(child))
            if count == 0:
                continue
            if isinstance(child, QuantLayer) or count <= max_layers:
                blocks.append(full)
            else:
                visit(full, child)

    if isinstance(qmodel, QuantLayer):
        return ['']
    visit('', qmodel)
    return blocks


def block_order(qmodel: nn.Module, blocks: Sequence[str], example: torch.Tensor) -> Tuple[List[str], Dict[str, int]]:
    """The blocks that run on ``example``, in the order they first run, and how many times each runs."""
    modules = dict(qmodel.named_modules())
    counts = call_counts(qmodel, example, [(name, modules[name]) for name in blocks])
    return list(counts), counts


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
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
    forward once the block has run its ``calls`` calls.
    """
    module = dict(qmodel.named_modules())[block]
    sizes = [int(samples[start:start + chunk].shape[0]) for start in range(0, samples.shape[0], chunk)]
    arguments: List[List[Call]] = [[] for _ in range(calls)]
    results: List[List[Any]] = [[] for _ in range(calls)]
    seen = [0]

    def hook(mod, args, kwargs, output):
        index = seen[0]
        if index < calls:
            arguments[index].append((_to_cpu(args), _to_cpu(kwargs)))
            if outputs:
                results[index].append(_to_cpu(output))
        seen[0] += 1
        if seen[0] >= calls:
            raise StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    device = next(qmodel.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, samples.shape[0], chunk):
                seen[0] = 0
                try:
                    qmodel(samples[start:start + chunk].to(device))
                except StopForward:
                    pass
    finally:
        handle.remove()
    merged_calls = [(_cat([a for a, _ in parts], sizes), _cat([k for _, k in parts], sizes)) for parts in arguments]
    merged_outputs = [_cat(parts, sizes) for parts in results] if outputs else []
    return merged_calls, merged_outputs


@dataclass
class BlockReconstruction:
    """Output error of one block before and after reconstruction, and what was kept."""

    name: str
    layers: int
    calls: int
    error_before: float
    error_after: float
    output_energy: float
    kept: bool
    seconds: float

    @property
    def reduction(self) -> float:
        """Fraction of the block's output error removed (0 when nothing was kept)."""
        if not self.kept or self.error_before <= 0:
            return 0.0
        return 1.0 - self.error_after / self.error_before

    def to_dict(self) -> dict:
        data = asdict(self)
        data['error_reduction'] = self.reduction
        return data


@dataclass
class ReconstructionReport:
    """Per block, what reconstruction changed; and how long it took."""

    blocks: List[BlockReconstruction] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        before = sum(relative_error(b.error_before, b.output_energy) for b in self.blocks)
        after = sum(relative_error(b.error_after if b.kept else b.error_before, b.output_energy)
                    for b in self.blocks)
        return {'seconds': self.seconds, 'relative_error_before': before, 'relative_error_after': after,
                'blocks': [block.to_dict() for block in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> 'ReconstructionReport':
        names = [f.name for f in fields(BlockReconstruction)]
        return cls(blocks=[BlockReconstruction(**{n: block[n] for n in names}) for block in data['blocks']],
                   seconds=data['seconds'])

    def summary(self) -> str:
        lines = [f"{'block':32s} {'layers':>6s} {'err before':>12s} {'err after':>12s} {'kept':>5s} {'s':>7s}"]
        for b in self.blocks:
            lines.append(f'{b.name[:32]:32s} {b.layers:6d} {b.error_before:12.4g} {b.error_after:12.4g} '
                         f'{"yes" if b.kept else "no":>5s} {b.seconds:7.1f}')
        kept = sum(b.kept for b in self.blocks)
        lines.append(f'block reconstruction: kept in {kept} of {len(self.blocks)} blocks, {self.seconds:.1f} s')
        return '\n'.join(lines)


class _SoftRounding:
    """The soft rounding variables of one layer, and the soft quantized weight they give."""

    def __init__(self, layer: QuantLayer) -> None:
        quantizer = layer.weight_quantizer
        self.quantizer = quantizer
        with torch.no_grad():
            clip = torch.clamp(quantizer.clip.detach(), min=MIN_STEP)
            self.step = quantizer.step(clip)
            self.position = quantizer.grid_position(layer.weight.detach(), clip)
            self.floor = torch.floor(self.position)
        self.variables = nn.Parameter(initial_variables(self.position - self.floor))

    def choice(self) -> torch.Tensor:
        return soft_choice(self.variables)

    def weight(self) -> torch.Tensor:
        top = self.quantizer.num_levels - 1
        return (torch.clamp(self.floor + self.choice(), 0, top) - self.quantizer.zero_point) * self.step

    def flags(self) -> torch.Tensor:
        return (self.choice() >= 0.5).to(torch.uint8)


@contextlib.contextmanager
def _dropped_quantization(quantizers: Sequence[nn.Module], probability: float,
                          generator: torch.Generator) -> Iterator[None]:
    """While active, each quantizer passes a random ``probability`` of its input values unquantized."""
    if probability <= 0:
        yield
        return
    saved = []
    for quantizer in quantizers:
        own = vars(quantizer).get('forward')
        inner = own if own is not None else type(quantizer).forward.__get__(quantizer)

        def forward(self, x, inner=inner):
            quantized = inner(x)
            keep = torch.rand(x.shape, generator=generator).to(x.device) < probability
            return torch.where(keep, x, quantized)
        saved.append((quantizer, own))
        quantizer.forward = types.MethodType(forward, quantizer)
    try:
        yield
    finally:
        for quantizer, own in saved:
            if own is None:
                del quantizer.forward
            else:
                quantizer.forward = own


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


def reconstruct_block(name: str, block: nn.Module, calls: Sequence[Call], targets: Sequence[Any],
                      settings: ReconstructionConfig) -> BlockReconstruction:
    """Learn the weight rounding and activation quantizers of ``block`` so its outputs on ``calls``
    (its inputs in the partly quantized network) match ``targets`` (the float block's outputs)."""
    start = time.perf_counter()
    device = next(block.parameters()).device
    layers = [layer for _, layer in quant_layers(block)]
    quantizers = [q for _, q in activation_quantizers(block)]
    for layer in layers:
        layer.set_mode('quant')
    # Rounding flags are buffers of the state: loading it back restores them (or rounding to nearest).
    before = {k: v.detach().clone() for k, v in block.state_dict().items()}
    energy = _energy(targets)
    error_before = _block_error(block, calls, targets, device)

    soft = [_SoftRounding(layer) for layer in layers] if settings.rounding else []
    groups = []
    if soft:
        for layer in layers:
            layer.weight_quantizer.set_rounding(None)
        groups.append({'params': [s.variables for s in soft], 'lr': settings.lr})
    if settings.activations:
        for quantizer in quantizers:
            for parameter in quantizer.parameters(recurse=False):
                scale = max(float(parameter.detach().abs().max()), MIN_STEP)
                groups.append({'params': [parameter], 'lr': settings.act_lr * scale})
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + zlib.crc32(name.encode()))
    samples = _tensors(targets[0])[0].shape[0]
    batch = min(settings.batch_size, samples)
    if groups:
        optimizer = torch.optim.Adam(groups)
        trained = [p for g in groups for p in g['params']]
        requires = [p.requires_grad for p in trained]
        for p in trained:
            p.requires_grad_(True)
        for layer, s in zip(layers, soft):
            layer.weight_override = s.weight
        try:
            with fast_fake_quantization(block), \
                    _dropped_quantization(quantizers, settings.drop_prob, generator), torch.enable_grad():
                for iteration in range(settings.iterations):
                    picks = torch.randperm(samples, generator=generator)[:batch]
                    loss = 0.0
                    for (args, kwargs), target in zip(calls, targets):
                        out = block(*_select(args, picks, samples, device), **_select(kwargs, picks, samples, device))
                        for o, t in zip(_tensors(out), _tensors(_select(target, picks, samples, device))):
                            loss = loss + relative_error((o - t).pow(2).mean(), energy)
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
            for layer in layers:
                layer.weight_override = None
            for p, r in zip(trained, requires):
                p.requires_grad_(r)
        with torch.no_grad():
            for layer, s in zip(layers, soft):
                layer.weight_quantizer.set_rounding(s.flags())
    error_after = _block_error(block, calls, targets, device)
    kept = error_after < error_before
    if not kept:
        block.load_state_dict(before)
    return BlockReconstruction(name=name or '(model)', layers=len(layers), calls=len(calls),
                               error_before=error_before, error_after=error_after, output_energy=energy,
                               kept=bool(kept), seconds=time.perf_counter() - start)


def reconstruct_blocks(qmodel: nn.Module, batches: Sequence[torch.Tensor], config: OAQConfig,
                       progress: bool = False, done: Optional[ReconstructionReport] = None,
                       safe_point: Optional[Callable[[Callable[[], dict]], None]] = None) -> ReconstructionReport:
    """Reconstruct every block of ``qmodel`` in place, in execution order, each on the inputs it sees
    with every earlier block quantized.

    Args:
        qmodel: A converted, calibrated (and usually searched) model.
        batches: The calibration batches; the first ``config.reconstruction.num_samples`` samples are used,
            cut to their top-left ``patch_size`` square.
        config: The method's configuration (``config.reconstruction``).
        progress: Show a progress bar over the blocks.
        done: The report of an interrupted run of this stage, whose blocks are already done in ``qmodel``.
        safe_point: Called before each block with a function returning the report so far as a dict.
    """
    settings = config.reconstruction
    start_time = time.perf_counter()
    samples = first_samples(batches, settings.num_samples)
    if samples is None:
        raise DataError('block reconstruction needs calibration samples, and the calibration batches are empty')
    if samples.dim() == 4:
        samples = samples[..., :settings.patch_size, :settings.patch_size]
    was_training = qmodel.training
    qmodel.eval()
    device = next(qmodel.parameters()).device
    modules = dict(qmodel.named_modules())
    candidates = reconstruction_blocks(qmodel, settings.max_layers)
    with modes_restored(qmodel):
        for _, layer in quant_layers(qmodel):
            layer.set_mode('float')
        names, counts = block_order(qmodel, candidates, samples[:1].to(device))
    report = ReconstructionReport()
    previous_seconds = 0.0
    if done is not None:
        report.blocks, previous_seconds = list(done.blocks), done.seconds
    finished = {block.name for block in report.blocks}
    bar = tqdm(total=len(names), initial=len(finished), desc='reconstruction', unit='block', disable=not progress,
               leave=False)
    try:
        with modes_restored(qmodel):
            for index, name in enumerate(names):
                if (name or '(model)') in finished:
                    continue
                if safe_point is not None:
                    report.seconds = previous_seconds + time.perf_counter() - start_time
                    safe_point(report.to_dict)
                block = modules[name]
                for _, layer in quant_layers(qmodel):
                    layer.set_mode('float')
                _, targets = capture_block(qmodel, name, samples, counts[name], outputs=True)
                for earlier in names[:index]:
                    for _, layer in quant_layers(modules[earlier]):
                        layer.set_mode('quant')
                calls, _ = capture_block(qmodel, name, samples, counts[name], outputs=False)
                result = reconstruct_block(name, block, calls, targets, settings)
                report.blocks.append(result)
                bar.update(1)
                bar.set_postfix(block=name, gain=f'{100 * result.reduction:.0f}%')
    finally:
        bar.close()
        qmodel.train(was_training)
    report.seconds = previous_seconds + time.perf_counter() - start_time
    return report
