"""Sensitivity-aware finetuning (SAFT; docs/METHOD.md, Stage: sensitivity-aware finetuning): the quantizer
parameters learn from the float model as teacher, one parameter group per epoch, on random calibration
crops (no ground truth).

Loss: ``w_sen * L_sen + lambda * L_rec`` with ``L_rec`` the mean absolute difference of the SR outputs
on the 0-255 scale and ``L_sen = (1/K) sum_k s_k ||F_fp^k/||F_fp^k|| - F_q^k/||F_q^k|| ||`` over the
feature taps, per sample. ``s_k`` is a softmax (temperature ``tau``) of the taps' mean per-sample
standard deviation on calibration crops; ``vanilla`` mode uses ``s_k = 1/K`` instead.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ...config import OAQConfig
from ...errors import NumericalError
from ...quant.activation import activation_quantizers, fast_fake_quantization
from ...quant.dual_region import DualRegionQuantizer
from ...quant.forward_hooks import forward_hooks
from ...quant.layers import quant_layers
from ...quant.observer import all_finite
from ...quant.seeding import seeded_generator
from ..capture.feature_taps import FeatureTaps, TapKey, tap_names
from ..io.patches import PatchSource
from ..resume import SafePoint
from .base import Record, Stage, StageContext, StageReport

logger = logging.getLogger('oaq_plugin')

# The parameter groups of SAFT, trained one an epoch in this order.
GROUPS = ('weight_clip', 'act_bounds', 'breakpoint')


@dataclass
class EpochRecord(Record):
    """One epoch: which group trained, at which learning rate, and the mean losses."""

    epoch: int
    group: str
    lr: float
    loss: float
    rec_loss: float
    sen_loss: float
    seconds: float


@dataclass
class FinetuneReport(StageReport):
    """What finetuning did: per-epoch losses, tap weights and timings."""

    mode: str
    tap_kind: str
    taps: List[str] = field(default_factory=list)
    tap_weights: List[float] = field(default_factory=list)
    tap_stds: List[float] = field(default_factory=list)
    epochs: List[EpochRecord] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    seconds_per_iteration: float = 0.0

    def summary(self) -> str:
        lines = [f"{'epoch':>5s} {'group':12s} {'lr':>9s} {'loss':>10s} {'L_rec':>9s} {'L_sen':>9s} {'s':>6s}"]
        for e in self.epochs:
            lines.append(f'{e.epoch:5d} {e.group:12s} {e.lr:9.3g} {e.loss:10.4f} {e.rec_loss:9.4f} '
                         f'{e.sen_loss:9.5f} {e.seconds:6.1f}')
        lines.append(f'finetune ({self.mode}, {len(self.taps)} {self.tap_kind} taps): {self.iterations} iterations '
                     f'in {self.seconds:.1f} s ({self.seconds_per_iteration:.2f} s/iteration)')
        return '\n'.join(lines)


def tap_weights(stds: Sequence[float], temperature: float, mode: str) -> torch.Tensor:
    """``s_k``: softmax of the tap standard deviations over ``temperature``, or uniform in ``vanilla`` mode."""
    stds_t = torch.tensor(list(stds), dtype=torch.float64)
    if mode == 'vanilla' or stds_t.numel() == 0:
        return torch.full_like(stds_t, 1.0 / max(stds_t.numel(), 1))
    return torch.softmax(stds_t / temperature, dim=0)


def parameter_groups(qmodel: nn.Module) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """The learnable quantizer parameters of SAFT, by group, named for messages."""
    groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, layer in quant_layers(qmodel):
        # A learned rounding holds for the clip it was learned with: moving the clip would shift the grid
        # under its round-up flags, so such clips stay fixed.
        if layer.weight_quantizer.rounding is None:
            groups['weight_clip'].append((f'{name}.weight_quantizer.clip', layer.weight_quantizer.clip))
    # Those of layers and of attention-matmul operands alike.
    for name, quantizer in activation_quantizers(qmodel):
        groups['act_bounds'] += [(f'{name}.lower', quantizer.lower), (f'{name}.upper', quantizer.upper)]
        if isinstance(quantizer, DualRegionQuantizer):
            groups['breakpoint'].append((f'{name}.breakpoint', quantizer.breakpoint))
    return {g: params for g, params in groups.items() if params}


def sensitivity_loss(fp_features: Dict[TapKey, torch.Tensor], q_features: Dict[TapKey, torch.Tensor],
                     keys: Sequence[TapKey], weights: torch.Tensor) -> torch.Tensor:
    """``(1/K) sum_k s_k ||F_fp/||F_fp|| - F_q/||F_q|| ||_2``, averaged over the samples of the batch."""
    total = None
    for key, weight in zip(keys, weights.tolist()):
        fp = fp_features[key].flatten(1)
        q = q_features[key].flatten(1)
        fp = fp / fp.norm(dim=1, keepdim=True).clamp_min(1e-12)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        term = weight * (fp - q).norm(dim=1).mean()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total / len(keys)


@torch.no_grad()
def measure_tap_stds(fp_model: nn.Module, taps: FeatureTaps, batches: Sequence[torch.Tensor],
                     keys: Sequence[TapKey]) -> List[float]:
    """Mean over samples of each tap's per-sample standard deviation, in the float model."""
    sums = {key: 0.0 for key in keys}
    count = 0
    for batch in batches:
        taps.clear()
        fp_model(batch)
        for key in keys:
            feature = taps.features[key].flatten(1)
            sums[key] += float(feature.std(dim=1, unbiased=False).sum())
        count += batch.shape[0]
    taps.clear()
    return [sums[key] / max(count, 1) for key in keys]


def _first_non_finite_layer(qmodel: nn.Module, batch: torch.Tensor) -> Optional[str]:
    """The first quantized layer whose output or quantizer parameters are not finite, if any."""
    for name, layer in quant_layers(qmodel):
        for pname, p in list(layer.act_quantizer.named_parameters()) + list(layer.weight_quantizer.named_parameters()):
            if not all_finite(p):
                return f'{name} ({pname})'
    found: List[str] = []

    def check(name: str, module: nn.Module, args, output) -> None:
        if not found and not all_finite(output):
            found.append(name)
    with forward_hooks(quant_layers(qmodel), check), torch.no_grad():
        qmodel(batch)
    return found[0] if found else None


def _raise_numerical(qmodel: nn.Module, batch: torch.Tensor, epoch: int, iteration: int) -> None:
    where = _first_non_finite_layer(qmodel, batch)
    place = f"in layer '{where}'" if where else 'in the loss'
    raise NumericalError(f'finetuning produced NaN/Inf {place} at epoch {epoch}, iteration {iteration}; '
                         'lower finetune.lr or check the calibration (a collapsed range or breakpoint)')


class _Trainer:
    """One finetuning run: teacher, student, taps, optimizer and the epoch loop."""

    def __init__(self, fp_model: nn.Module, qmodel: nn.Module, source: PatchSource, config: OAQConfig,
                 keys: Sequence[TapKey], weights: torch.Tensor, fp_taps: FeatureTaps, q_taps: FeatureTaps,
                 generator: torch.Generator, device: torch.device) -> None:
        self.fp_model, self.qmodel, self.source = fp_model, qmodel, source
        self.settings = config.finetune
        self.keys, self.weights = keys, weights
        self.fp_taps, self.q_taps = fp_taps, q_taps
        self.generator, self.device = generator, device
        self.groups = parameter_groups(qmodel)
        self.order = [g for g in GROUPS if g in self.groups]
        self.lr = {g: self.settings.lr for g in self.order}
        # One Adam; each parameter is its own Adam group so that ``relative`` learning rates can scale
        # by the parameter's size. ``name`` says which SAFT group it trains with.
        param_groups = []
        for g in self.order:
            for _, p in self.groups[g]:
                scale = 1.0
                if self.settings.lr_mode == 'relative':
                    scale = max(float(p.detach().abs().mean()), 1e-8)
                param_groups.append({'params': [p], 'lr': self.settings.lr * scale, 'name': g, 'scale': scale})
        self.optimizer = torch.optim.Adam(param_groups, lr=self.settings.lr)

    def step(self, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.settings
        with torch.no_grad():
            self.fp_taps.clear()
            target = self.fp_model(batch) * s.output_scale
        self.q_taps.clear()
        output = self.qmodel(batch) * s.output_scale
        rec = (output - target).abs().mean()
        sen = sensitivity_loss(self.fp_taps.features, self.q_taps.features, self.keys, self.weights)
        return s.sen_weight * sen + s.rec_weight * rec, rec, sen

    def state(self, epoch: int, iteration: int, sums: Sequence[float], seconds: float) -> dict:
        """Everything the loop needs to go on from ``iteration`` of ``epoch`` exactly as it would have."""
        return {'epoch': epoch, 'iteration': iteration, 'sums': list(sums), 'epoch_seconds': seconds,
                'lr': dict(self.lr), 'optimizer': self.optimizer.state_dict(), 'generator': self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        """Restore a :meth:`state` (the quantizer parameters themselves are restored with the model)."""
        self.lr = dict(state['lr'])
        # Also restores each parameter's learning-rate scale, which ``relative`` mode measured at the start.
        self.optimizer.load_state_dict(state['optimizer'])
        self.generator.set_state(state['generator'])

    def epoch(self, epoch: int, bar: tqdm, safe_point: SafePoint, resume: Optional[dict] = None) -> EpochRecord:
        """Train the epoch's group; ``safe_point`` is offered the loop state before every iteration, and
        ``resume`` (such a state) continues an interrupted epoch."""
        s = self.settings
        active = self.order[epoch % len(self.order)]
        for group in self.order:
            for _, p in self.groups[group]:
                p.requires_grad_(group == active)
        lr = self.lr[active]
        for param_group in self.optimizer.param_groups:
            if param_group['name'] == active:
                param_group['lr'] = lr * param_group['scale']
        start = time.perf_counter()
        first, sums, before = 0, [0.0, 0.0, 0.0], 0.0
        if resume is not None:
            first, sums, before = resume['iteration'], list(resume['sums']), resume['epoch_seconds']
        for iteration in range(first, s.iters_per_epoch):
            safe_point(lambda: self.state(epoch, iteration, sums, before + time.perf_counter() - start))
            batch = self.source.batch(s.batch_size, s.patch_size, self.generator, augment=True).to(self.device)
            loss, rec, sen = self.step(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Checked before the step, so that the parameters still show where the problem started.
            if not all_finite(loss) or not all(p.grad is None or all_finite(p.grad) for _, p in self.groups[active]):
                _raise_numerical(self.qmodel, batch, epoch, iteration)
            self.optimizer.step()
            for index, value in enumerate((loss, rec, sen)):
                sums[index] += float(value.detach())
            bar.update(1)
            bar.set_postfix(epoch=epoch, group=active, loss=f'{sums[0] / (iteration + 1):.4f}')
        self.lr[active] = lr * s.lr_decay
        count = s.iters_per_epoch
        return EpochRecord(epoch=epoch, group=active, lr=lr, loss=sums[0] / count, rec_loss=sums[1] / count,
                           sen_loss=sums[2] / count, seconds=before + time.perf_counter() - start)

    def release(self) -> None:
        for params in self.groups.values():
            for _, p in params:
                p.requires_grad_(False)


class FinetuneStage(Stage):
    """Finetuning; resumable before any iteration.

    Its safe points offer the loop's state (epoch, iteration, optimizer, learning rates, generator, epochs
    so far); resumed with such a state and the model's parameters saved beside it, training goes on to the
    parameters an uninterrupted run reaches (the tap weights are measured again, from the same crops).
    """

    name = 'finetune'
    report_type = FinetuneReport

    def run(self, context: StageContext) -> FinetuneReport:
        return _finetune(context)


def finetune(fp_model: nn.Module, qmodel: nn.Module, source: PatchSource, config: OAQConfig,
             progress: bool = False, epoch_callback: Optional[Callable[[EpochRecord], None]] = None
             ) -> FinetuneReport:
    """Finetune the quantizer parameters of ``qmodel`` in place, with ``fp_model`` as teacher.

    Args:
        fp_model: The float network (not modified).
        qmodel: The converted, calibrated (and possibly searched) network.
        source: The calibration pool; random crops with flips/rotations are drawn from it each epoch.
        config: The method's configuration (``config.finetune``).
        progress: Show a progress bar with the running loss.
        epoch_callback: Called after every epoch with its record (for logging; it must not select).

    Returns:
        A :class:`FinetuneReport`; the model after the last epoch is the result (nothing is selected).
    """
    context = StageContext(qmodel=qmodel, batches=(), config=config, float_model=fp_model, source=source,
                           progress=progress)
    return _finetune(context, epoch_callback)


def _finetune(context: StageContext, epoch_callback: Optional[Callable[[EpochRecord], None]] = None
              ) -> FinetuneReport:
    fp_model, qmodel, source, config = context.float_model, context.qmodel, context.source, context.config
    progress, resume = context.progress, context.saved
    settings = config.finetune
    start_time = time.perf_counter()
    device = next(qmodel.parameters()).device
    generator = seeded_generator(settings.seed)
    report = FinetuneReport(mode=settings.mode, tap_kind='')
    with contextlib.ExitStack() as stack:
        # BatchNorm and dropout keep their inference behaviour: only the quantizer parameters learn.
        for model in (fp_model, qmodel):
            stack.callback(model.train, model.training)
            model.eval()
        stats_batches = [source.batch(settings.batch_size, settings.patch_size, generator).to(device)
                         for _ in range(max(1, math.ceil(settings.tap_samples / settings.batch_size)))]
        names, where, report.tap_kind = tap_names(fp_model, qmodel, settings.taps, settings.tap_patterns,
                                                  stats_batches[0][:1])
        fp_taps = FeatureTaps(fp_model, names, where)
        q_taps = FeatureTaps(qmodel, names, where)
        stack.callback(q_taps.remove)
        stack.callback(fp_taps.remove)
        with torch.no_grad():
            fp_model(stats_batches[0][:1])
        keys = sorted(fp_taps.features, key=lambda k: (names.index(k[0]), k[1]))
        stds = measure_tap_stds(fp_model, fp_taps, stats_batches, keys)
        weights = tap_weights(stds, settings.temperature, settings.mode)
        report.taps = [name if call == 0 else f'{name}#{call}' for name, call in keys]
        report.tap_stds = stds
        report.tap_weights = weights.tolist()
        logger.info('finetune (%s): %d %s taps, s_k = %s (std %s, temperature %g)', settings.mode, len(keys),
                    report.tap_kind, ', '.join(f'{w:.3f}' for w in report.tap_weights),
                    ', '.join(f'{v:.3g}' for v in stds), settings.temperature)

        trainer = _Trainer(fp_model, qmodel, source, config, keys, weights, fp_taps, q_taps, generator, device)
        stack.callback(trainer.release)
        first_epoch, done, previous_seconds = 0, 0, 0.0
        if resume is not None:
            trainer.load_state(resume)
            report.epochs = [EpochRecord.from_dict(record) for record in resume['epochs']]
            first_epoch, previous_seconds = resume['epoch'], resume['seconds']
            done = first_epoch * settings.iters_per_epoch + resume['iteration']

        def point(loop_state: Callable[[], dict]) -> None:
            context.safe_point(lambda: {**loop_state(), 'epochs': [e.to_dict() for e in report.epochs],
                                        'seconds': previous_seconds + time.perf_counter() - start_time})
        if settings.fast_fake_quant:
            stack.enter_context(fast_fake_quantization(qmodel))
        bar = stack.enter_context(tqdm(total=settings.epochs * settings.iters_per_epoch, initial=done,
                                       desc=f'finetune ({settings.mode})', unit='it', disable=not progress,
                                       leave=False))
        for epoch in range(first_epoch, settings.epochs):
            report.epochs.append(trainer.epoch(epoch, bar, point, resume if epoch == first_epoch else None))
            if epoch_callback is not None:
                epoch_callback(report.epochs[-1])
    report.iterations = settings.epochs * settings.iters_per_epoch
    report.seconds = previous_seconds + time.perf_counter() - start_time
    report.seconds_per_iteration = sum(e.seconds for e in report.epochs) / max(report.iterations, 1)
    return report
