"""Distillation with trainable weights (beyond the paper; ``OAQConfig.distillation``): the whole quantized
network learns to reproduce the float network's output on random augmented crops of the calibration
images, after block reconstruction has fitted it block by block.

What trains: every quantized weight, as an offset from where the earlier stages left it, in units
of its layer's quantization step (its codes follow the moved weight by rounding to nearest, with a
straight-through gradient), and the bounds and breakpoints of the activation grids with at most
``activation_bits`` bits, and, with ``float_lr``, every parameter the network keeps in float (the
quantized layers' biases, PReLU slopes, layers left unquantized). Weight clips stay as searched. The loss
is the squared error of the output relative to its float energy, plus, with ``feature_weight``, the same
relative error averaged over feature taps (block outputs, or layer inputs); the learning rates decay on a
cosine. No ground truth is used.

Before training, each layer's learned rounding is dropped and its weight moved just far enough to round to
nearest onto the same codes (into its code's rounding interval), so the model is unchanged until it trains.
The result is kept only when the output error, relative to the float output's energy, drops on crops
held aside from the training crops; otherwise every trained value is put back.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ...config import DistillationConfig
from ...quant.activation import (ActivationQuantizer, activation_quantizers, dropped_quantization,
                                 fast_fake_quantization)
from ...quant.layers import QuantLayer, quant_layers
from ...quant.observer import all_finite
from ...quant.seeding import seeded_generator
from ...quant.weight import WeightQuantizer
from ..capture.feature_taps import FeatureTaps, tap_names
from ..io.patches import PatchSource
from .base import Stage, StageContext, StageReport, only_trained
from .distillation_length import planned_iterations
from .search import relative_error

logger = logging.getLogger('oaq_plugin')

# How far inside its code's rounding interval (in steps) a weight starts (``_WeightOffset``).
_EDGE_MARGIN = 0.02
# Floor of an activation parameter's learning-rate scale, as a fraction of its grid's span (a breakpoint
# or bound at zero still moves).
_SPAN_FRACTION = 1e-2


@dataclass
class DistillationReport(StageReport):
    """What distillation did: the output error on the held-aside crops before and after, and whether the
    result was kept."""

    iterations: int = 0
    planned: int = 0
    weight_layers: int = 0
    activation_quantizers: int = 0
    float_parameters: int = 0
    error_before: float = float('nan')
    error_after: float = float('nan')
    kept: bool = False
    skipped: str = ''
    feature_taps: int = 0
    tap_kind: str = ''
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_iteration: float = 0.0

    def derived(self) -> Dict[str, Any]:
        gain = None
        if self.error_before > 0 and self.error_after > 0:
            gain = 10.0 * math.log10(self.error_before / self.error_after)
        return {'gain_db': gain}

    def summary(self) -> str:
        if self.skipped:
            return f'distillation skipped: {self.skipped}'
        gain = self.derived()['gain_db']
        taps = f', {self.feature_taps} {self.tap_kind} feature taps' if self.feature_taps else ''
        floats = f', {self.float_parameters} float parameters' if self.float_parameters else ''
        planned = '' if self.planned == self.iterations else f' (of {self.planned} planned)'
        return (f'distillation: {self.iterations} iterations{planned} on {self.weight_layers} layers\' weights and '
                f'{self.activation_quantizers} activation grids{floats}{taps} in {self.seconds:.1f} s '
                f'({self.seconds_per_iteration:.2f} s/iteration); relative output error on held-aside crops '
                f'{self.error_before:.3e} -> {self.error_after:.3e}'
                + (f' ({gain:+.2f} dB)' if gain is not None else '') + ('' if self.kept else ', not kept'))


class _WeightOffset:
    """A layer's weight as ``start + offset * step``: ``start`` a value that rounds to nearest onto the codes the
    earlier stages chose (written into the layer, its learned rounding dropped), ``offset`` trainable,
    ``step`` the layer's quantization step.

    ``start`` is the float weight moved into its code's rounding interval (by at most what the learned
    rounding moved it, kept ``_EDGE_MARGIN`` steps inside): weights then start spread over their intervals,
    as their float values are, and cross to a neighbouring code one by one as they train. (Started at the
    centres of their intervals, every weight with a steady gradient reaches a boundary at the same
    iteration under Adam, and tens of thousands of codes changed at once.)
    """

    def __init__(self, layer: QuantLayer) -> None:
        self.layer = layer
        quantizer = layer.weight_quantizer
        with torch.no_grad():
            clip = quantizer.effective_clip(quantizer.clip)
            codes, _, _ = quantizer.integer_codes(layer.weight)
            codes = codes.to(layer.weight.dtype)
            position = quantizer.grid_position(layer.weight, clip)
            low = torch.clamp(codes - 0.5 + _EDGE_MARGIN, min=0.0)
            high = torch.clamp(codes + 0.5 - _EDGE_MARGIN, max=quantizer.num_levels - 1)
            self.step = quantizer.step(clip).detach()
            start = torch.minimum(torch.maximum(position, low), high) * self.step - clip
            quantizer.set_rounding(None)
            layer.module.weight.copy_(start)
            self.start = start
        self.offset = nn.Parameter(torch.zeros_like(start))

    def weight(self) -> torch.Tensor:
        return self.layer.weight + self.offset * self.step

    def forward(self, layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.float_op(layer.act_quantizer(x), layer.weight_quantizer(self.weight()))

    @torch.no_grad()
    def commit(self) -> None:
        """Move the offset into the layer's weight."""
        self.layer.module.weight.add_(self.offset * self.step)
        self.offset.zero_()

    @torch.no_grad()
    def put_back(self) -> None:
        """The layer's weight back where it started (on the codes the earlier stages chose)."""
        self.layer.module.weight.copy_(self.start)


def _trainable_weights(qmodel: nn.Module) -> List[QuantLayer]:
    """The quantized layers whose weight trains: each one whose weight no other quantized layer shares
    (a shared weight has a quantizer per sharer and no one value to move)."""
    layers = [layer for _, layer in quant_layers(qmodel)]
    owners: Dict[int, int] = {}
    for layer in layers:
        owners[id(layer.module.weight)] = owners.get(id(layer.module.weight), 0) + 1
    return [layer for layer in layers if owners[id(layer.module.weight)] == 1]


def _activation_parameters(qmodel: nn.Module, max_bits: int) -> List[Tuple[str, nn.Parameter, float]]:
    """``(name, parameter, lr scale)`` for the bounds and breakpoints of activation grids of at most
    ``max_bits`` bits; the scale is the parameter's magnitude, floored at a fraction of its grid's span."""
    params = []
    for name, quantizer in activation_quantizers(qmodel):
        if quantizer.bits > max_bits:
            continue
        span = float((quantizer.upper.detach() - quantizer.lower.detach()).abs())
        for pname, p in quantizer.named_parameters(recurse=False):
            scale = max(float(p.detach().abs().max()), _SPAN_FRACTION * span, 1e-8)
            params.append((f'{name}.{pname}', p, scale))
    return params


def _float_parameters(qmodel: nn.Module) -> List[Tuple[str, nn.Parameter, float]]:
    """``(name, parameter, lr scale)`` for every parameter of ``qmodel`` that stays float: not a quantized
    layer's weight and not a parameter of a quantizer; the scale is the tensor's mean magnitude (a tensor
    of zeros does not move)."""
    quantized = {id(layer.module.weight) for _, layer in quant_layers(qmodel)}
    for module in qmodel.modules():
        if isinstance(module, (ActivationQuantizer, WeightQuantizer)):
            quantized.update(id(p) for p in module.parameters())
    params, seen = [], set()
    for name, p in qmodel.named_parameters():
        if id(p) in quantized or id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        params.append((name, p, max(float(p.detach().abs().mean()), 1e-12)))
    return params


@torch.no_grad()
def _float_outputs(fp_model: nn.Module, crops: torch.Tensor, chunk: int) -> Optional[List[torch.Tensor]]:
    """The float network's output on ``crops``, one tensor per chunk; ``None`` when its output is not one
    tensor."""
    outputs = []
    for start in range(0, crops.shape[0], chunk):
        output = fp_model(crops[start:start + chunk])
        if not isinstance(output, torch.Tensor):
            return None
        outputs.append(output.double())
    return outputs


@torch.no_grad()
def _check_error(qmodel: nn.Module, crops: torch.Tensor, targets: List[torch.Tensor], chunk: int) -> float:
    """Squared output error on ``crops`` (in chunks) over the energy of the float outputs ``targets``."""
    error = energy = 0.0
    for start, target in zip(range(0, crops.shape[0], chunk), targets):
        error += float(((qmodel(crops[start:start + chunk]).double() - target) ** 2).sum())
        energy += float((target ** 2).sum())
    return relative_error(error, energy)


class _FeatureTerm:
    """Feature taps on teacher and student (the same module names); after one forward of each,
    :meth:`loss` is the mean over taps of the student's squared error relative to the teacher's energy."""

    def __init__(self, fp_model: nn.Module, qmodel: nn.Module, example: torch.Tensor) -> None:
        names, where, self.kind = tap_names(fp_model, qmodel, 'blocks', (), example)
        self.teacher = FeatureTaps(fp_model, names, where)
        self.student = FeatureTaps(qmodel, names, where)

    def clear(self) -> None:
        self.teacher.clear()
        self.student.clear()

    def loss(self) -> Tuple[Optional[torch.Tensor], int]:
        """``(term, taps)``: the mean relative error over the taps both forwards recorded (``None`` when
        there was none) and how many."""
        terms = []
        for key, fp in self.teacher.features.items():
            q = self.student.features.get(key)
            if q is None or q.shape != fp.shape:
                continue
            fp = fp.detach()
            terms.append(relative_error(((q - fp) ** 2).mean(), float((fp ** 2).mean())))
        self.clear()
        if not terms:
            return None, 0
        return torch.stack(terms).mean(), len(terms)

    def remove(self) -> None:
        self.teacher.remove()
        self.student.remove()


@contextlib.contextmanager
def _training_setup(offsets: List[_WeightOffset], params: List[Tuple[str, nn.Parameter, float]]
                    ) -> Iterator[None]:
    """While active, each layer computes with its offset weight and the parameters trained in place
    (activation grids, float parameters) take gradients."""
    executors = [(o.layer, o.layer.executor) for o in offsets]
    grads = [(p, p.requires_grad) for _, p, _ in params]
    for offset in offsets:
        offset.layer.executor = offset.forward
    for _, p, _ in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for layer, executor in executors:
            layer.executor = executor
        for p, flag in grads:
            p.requires_grad_(flag)


def _cosine(base: float, iteration: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * iteration / total))


class DistillationStage(Stage):
    """Distillation; resumable before any iteration (its safe points offer the offsets, the optimizer, the
    crop generator and the values to put back if the result is not kept)."""

    name = 'distillation'
    report_type = DistillationReport

    def run(self, context: StageContext) -> DistillationReport:
        return distill(context)


def distill(context: StageContext) -> DistillationReport:
    """Run the stage on ``context.qmodel`` in place, with ``context.float_model`` as teacher and crops of
    ``context.source``."""
    settings: DistillationConfig = context.config.distillation
    qmodel, fp_model, source = context.qmodel, context.float_model, context.source
    report = DistillationReport()
    start_time = time.perf_counter()
    reason = _skip_reason(qmodel, fp_model, source)
    if reason:
        report.skipped = reason
        logger.info('distillation skipped: %s', reason)
        return report
    device = next(qmodel.parameters()).device
    with contextlib.ExitStack() as stack:
        for model in (fp_model, qmodel):
            stack.callback(model.train, model.training)
            model.eval()
        check = source.batch(settings.check_crops, settings.patch_size,
                             seeded_generator(settings.seed, 'distillation check')).to(device)
        targets = _float_outputs(fp_model, check, settings.batch_size)
        if targets is None:
            report.skipped = "the network's output is not one tensor"
            logger.info('distillation skipped: %s', report.skipped)
            return report
        act_params = _activation_parameters(qmodel, settings.activation_bits)
        float_params = _float_parameters(qmodel) if settings.float_lr > 0 else []
        trainable = _trainable_weights(qmodel)
        if not trainable and not act_params and not float_params:
            report.skipped = 'no weight or activation grid to train'
            logger.info('distillation skipped: %s', report.skipped)
            return report
        offsets = [_WeightOffset(layer) for layer in trainable]
        report.weight_layers, report.activation_quantizers = len(offsets), len({n.rsplit('.', 1)[0]
                                                                               for n, _, _ in act_params})
        report.float_parameters = sum(p.numel() for _, p, _ in float_params)
        groups = [{'params': [o.offset], 'lr': settings.weight_lr, 'base': settings.weight_lr} for o in offsets]
        groups += [{'params': [p], 'lr': settings.act_lr * scale, 'base': settings.act_lr * scale}
                   for _, p, scale in act_params]
        groups += [{'params': [p], 'lr': settings.float_lr * scale, 'base': settings.float_lr * scale}
                   for _, p, scale in float_params]
        params = act_params + float_params  # trained in place, and put back when not kept
        total = report.planned = planned_iterations(qmodel, check[:1], settings)
        optimizer = torch.optim.Adam(groups)
        generator = seeded_generator(settings.seed, 'distillation')
        drop_generator = seeded_generator(settings.seed, 'distillation drop')
        saved = context.saved
        if saved is None:
            initial = {name: p.detach().clone() for name, p, _ in params}
            report.error_before = _check_error(qmodel, check, targets, settings.batch_size)
            first, previous_seconds = 0, 0.0
        else:
            initial = dict(saved['initial'])
            report.error_before, report.losses = saved['error_before'], list(saved['losses'])
            first, previous_seconds = saved['iteration'], saved['seconds']
            with torch.no_grad():
                for offset, value in zip(offsets, saved['offsets']):
                    offset.offset.copy_(value)
            optimizer.load_state_dict(saved['optimizer'])
            generator.set_state(saved['generator'])
            if 'drop_generator' in saved:  # absent from states saved before the drop existed
                drop_generator.set_state(saved['drop_generator'])
        stack.enter_context(_training_setup(offsets, params))
        stack.enter_context(only_trained(qmodel, [p for _, p, _ in params]))
        stack.enter_context(fast_fake_quantization(qmodel))
        stack.enter_context(dropped_quantization(activation_quantizers(qmodel), settings.drop_prob,
                                                 drop_generator))
        features = None
        if settings.feature_weight > 0:
            features = _FeatureTerm(fp_model, qmodel, check[:1])
            stack.callback(features.remove)
            report.tap_kind = features.kind
        bar = stack.enter_context(tqdm(total=total, initial=first, desc='distillation', unit='it',
                                       disable=not context.progress, leave=False))
        window = max(1, total // 4)
        running = saved['running'] if saved is not None else 0.0
        failed = ''
        done = first
        loop_start = time.perf_counter()
        for iteration in range(first, total):
            context.safe_point(lambda: {
                'iteration': iteration, 'offsets': [o.offset.detach().clone() for o in offsets],
                'optimizer': optimizer.state_dict(), 'generator': generator.get_state(),
                'drop_generator': drop_generator.get_state(), 'initial': initial,
                'error_before': report.error_before, 'losses': list(report.losses), 'running': running,
                'seconds': previous_seconds + time.perf_counter() - loop_start})
            for group in optimizer.param_groups:
                group['lr'] = _cosine(group['base'], iteration, total)
            batch = source.batch(settings.batch_size, settings.patch_size, generator, augment=True).to(device)
            with torch.no_grad():
                target = fp_model(batch)
            loss = relative_error(((qmodel(batch) - target) ** 2).mean(), float((target ** 2).mean()))
            if features is not None:
                term, report.feature_taps = features.loss()
                if term is not None:
                    loss = loss + settings.feature_weight * term
            if not all_finite(loss):
                failed = f'non-finite loss at iteration {iteration}'
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = iteration + 1
            running += float(loss.detach())
            if (iteration + 1) % window == 0 or iteration + 1 == total:
                report.losses.append(running / ((iteration % window) + 1))
                running = 0.0
            bar.update(1)
            bar.set_postfix(loss=f'{float(loss.detach()):.3e}')
        report.iterations = done
        train_seconds = previous_seconds + time.perf_counter() - loop_start
    for offset in offsets:
        offset.commit()
    report.error_after = float('nan') if failed else _check_error(qmodel, check, targets, settings.batch_size)
    report.kept = not failed and report.error_after < report.error_before
    if not report.kept:
        _put_back(offsets, params, initial)
        report.skipped = failed
    report.seconds = previous_seconds + time.perf_counter() - start_time
    report.seconds_per_iteration = train_seconds / max(done, 1)
    logger.info(report.summary())
    return report


def _skip_reason(qmodel: nn.Module, fp_model: Optional[nn.Module], source: Optional[PatchSource]) -> str:
    if fp_model is None or source is None:
        return 'no float network or calibration pool to distil from'
    if not quant_layers(qmodel):
        return 'no quantized layer'
    return ''


@torch.no_grad()
def _put_back(offsets: List[_WeightOffset], params: List[Tuple[str, nn.Parameter, float]],
              initial: Dict[str, torch.Tensor]) -> None:
    """Undo the training: each weight back on its grid value, each parameter trained in place to its start."""
    for offset in offsets:
        offset.put_back()
    for name, p, _ in params:
        p.copy_(initial[name])
