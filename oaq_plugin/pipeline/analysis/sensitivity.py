"""Per-layer sensitivity analysis: quantize one layer at a time, the rest in float, and measure the PSNR drop;
optionally a bit allocation that gives more bits to the most sensitive layers under an average bit budget.

The images are (LR, reference) pairs given by the caller. For choosing anything (the allocation), the
reference must not be a test set: use held-out calibration crops with the float model's output as the
reference (:func:`fidelity_pairs`), i.e. fidelity PSNR.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm import tqdm

from ...config import MAX_BITS, MIN_BITS, AnalysisConfig, OAQConfig
from ...errors import ConfigError, DataError
from ...quant.convert import modes_restored, quantized_modules, set_mode
from ...quant.layers import QuantLayer, quant_layers
from ..metrics.image_quality import psnr_from_mse, y_mse

ImagePair = Tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def image_errors(model: nn.Module, pairs: Sequence[ImagePair], crop_border: int) -> Tuple[float, float]:
    """``(mean PSNR, mean MSE)`` of ``model`` over (LR, reference) pairs, per image then averaged."""
    device = next(model.parameters()).device
    errors = [y_mse(model(lr[None].to(device))[0].cpu(), ref, crop_border) for lr, ref in pairs]
    psnrs = [psnr_from_mse(e) for e in errors]
    return sum(psnrs) / len(psnrs), sum(errors) / len(errors)


def mean_psnr(model: nn.Module, pairs: Sequence[ImagePair], crop_border: int) -> float:
    """Mean Y-PSNR of ``model`` over (LR, reference) pairs."""
    return image_errors(model, pairs, crop_border)[0]


@torch.no_grad()
def fidelity_pairs(fp_model: nn.Module, lr_images: Sequence[torch.Tensor]) -> List[ImagePair]:
    """(LR, float output) pairs: the reference for fidelity PSNR, for data without ground truth."""
    device = next(fp_model.parameters()).device
    was_training = fp_model.training
    fp_model.eval()
    pairs = [(lr, fp_model(lr[None].to(device))[0].cpu().clamp(0, 1)) for lr in lr_images]
    fp_model.train(was_training)
    return pairs


@dataclass
class LayerSensitivity:
    """One layer quantized (at ``w_bits``/``a_bits``), the rest float: its PSNR, the drop from the float
    model, and ``error``, the increase of the mean squared Y error (what the allocation adds up)."""

    name: str
    role: str
    w_bits: int
    a_bits: int
    num_weights: int
    psnr: float
    drop: Optional[float]
    error: float


def _finite(value: Optional[float]) -> Optional[float]:
    return None if value is None or math.isinf(value) else value


@dataclass
class SensitivityReport:
    """The per-layer analysis. ``reference`` is ``hr`` (ground truth) or ``fp`` (the float output: then
    the float PSNR is infinite, the drop undefined, and the PSNR is the fidelity PSNR)."""

    reference: str
    float_psnr: float
    float_mse: float
    layers: List[LayerSensitivity] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        layers = []
        for layer in self.layers:
            data = asdict(layer)
            data['psnr'] = _finite(layer.psnr)
            layers.append(data)
        return {'reference': self.reference, 'float_psnr': _finite(self.float_psnr), 'float_mse': self.float_mse,
                'seconds': self.seconds, 'layers': layers}

    def ranked(self) -> List[LayerSensitivity]:
        """Layers from the most to the least sensitive."""
        return sorted(self.layers, key=lambda layer: layer.error, reverse=True)

    def summary(self, top: int = 10) -> str:
        head = (f'float PSNR {self.float_psnr:.2f} dB' if self.reference == 'hr'
                else 'PSNR against the float output (fidelity)')
        lines = [f'{head}; most sensitive layers of {len(self.layers)}:',
                 f"{'layer':36s} {'W/A':>5s} {'PSNR':>7s} {'drop':>7s}"]
        for layer in self.ranked()[:top]:
            drop = f'{layer.drop:7.2f}' if layer.drop is not None else f"{'-':>7s}"
            lines.append(f'{layer.name[:36]:36s} {layer.w_bits}/{layer.a_bits:<3d} {layer.psnr:7.2f} {drop}')
        return '\n'.join(lines)


@contextlib.contextmanager
def layer_bits(layer: QuantLayer, bits: Optional[int]) -> Iterator[None]:
    """Temporarily run ``layer`` at ``bits`` for weight and activation (``None``: unchanged).

    The weight clip is searched again for the new width (the shrink search); the activation bounds and
    breakpoint are kept, as they describe the data and not the width.
    """
    if bits is None or (bits == layer.weight_quantizer.bits and bits == layer.act_quantizer.bits):
        yield
        return
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    saved = (wq.bits, aq.bits, wq.clip.detach().clone(), wq.rounding)
    try:
        wq.bits = aq.bits = int(bits)
        # A learned rounding belongs to the width and clip it was learned for: round to nearest meanwhile.
        wq.set_rounding(None)
        wq.initialize(layer.weight)
        yield
    finally:
        wq.bits, aq.bits = saved[0], saved[1]
        wq.set_rounding(saved[3])
        with torch.no_grad():
            wq.clip = nn.Parameter(saved[2], requires_grad=False)


@contextlib.contextmanager
def _only_quantized(qmodel: nn.Module, name: str) -> Iterator[None]:
    with modes_restored(qmodel):
        for n, module in quantized_modules(qmodel):
            module.set_mode('quant' if n == name else 'float')
        yield


def layer_sensitivity(qmodel: nn.Module, pairs: Sequence[ImagePair], crop_border: int, reference: str = 'hr',
                      bits: Optional[int] = None, names: Optional[Sequence[str]] = None,
                      progress: bool = False) -> SensitivityReport:
    """Quantize one layer at a time (the others in float) and measure the PSNR drop of each.

    Args:
        qmodel: A converted, calibrated model (its layer modes are restored afterwards).
        pairs: (LR, reference) image pairs, RGB [0, 1], (C, H, W). Never a test set when the result is
            used to choose anything.
        crop_border: Border cropped before the PSNR (the scale).
        reference: What the references are, for the report: ``hr`` (ground truth) or ``fp`` (float output).
        bits: Analyse every layer at this width instead of its planned one.
        names: Only these layers (default: every quantized layer).
        progress: Show a progress bar.
    """
    if not pairs:
        raise DataError('the sensitivity analysis needs at least one (LR, reference) image pair')
    start = time.perf_counter()
    layers = [(n, layer) for n, layer in quant_layers(qmodel) if names is None or n in names]
    was_training = qmodel.training
    qmodel.eval()
    try:
        with _all_float(qmodel):
            float_psnr, float_mse = image_errors(qmodel, pairs, crop_border)
        report = SensitivityReport(reference=reference, float_psnr=float_psnr, float_mse=float_mse)
        for name, layer in tqdm(layers, desc='sensitivity', unit='layer', disable=not progress, leave=False):
            with _only_quantized(qmodel, name), layer_bits(layer, bits):
                psnr, mse = image_errors(qmodel, pairs, crop_border)
            report.layers.append(LayerSensitivity(
                name=name, role=layer.role, w_bits=layer.weight_quantizer.bits if bits is None else bits,
                a_bits=layer.act_quantizer.bits if bits is None else bits, num_weights=layer.weight.numel(),
                psnr=psnr, drop=float_psnr - psnr if math.isfinite(float_psnr) else None,
                error=mse - float_mse))
    finally:
        qmodel.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


@contextlib.contextmanager
def _all_float(qmodel: nn.Module) -> Iterator[None]:
    with modes_restored(qmodel):
        set_mode(qmodel, 'float')
        yield


def plot_sensitivity(report: SensitivityReport, path: Union[str, Path], title: str = '') -> Path:
    """A bar chart of the PSNR drop per layer, in execution order, written as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [layer.name for layer in report.layers]
    use_drop = all(layer.drop is not None for layer in report.layers)
    values = [layer.drop if use_drop else layer.psnr for layer in report.layers]
    finite = [v for v in values if math.isfinite(v)]
    # A layer whose quantization leaves the output unchanged has an infinite fidelity PSNR: drawn hatched
    # at the top of the axis rather than left out (an empty slot would read as the most sensitive).
    top = (max(finite) * 1.05 if finite else 1.0)
    infinite = [not math.isfinite(v) for v in values]
    values = [top if inf else v for v, inf in zip(values, infinite)]
    colours = {'first': 'tab:green', 'last': 'tab:red', 'upsampler': 'tab:purple', 'body': 'tab:blue'}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 4.2))
    bars = ax.bar(range(len(names)), values, color=[colours.get(layer.role, 'tab:gray') for layer in report.layers])
    for bar, inf in zip(bars, infinite):
        if inf:
            bar.set_hatch('//')
            bar.set_alpha(0.4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel('PSNR drop (dB)' if use_drop else 'fidelity PSNR (dB)\nlower = more sensitive')
    bits = sorted({(layer.w_bits, layer.a_bits) for layer in report.layers})
    label = ', '.join(f'W{w}A{a}' for w, a in bits)
    reference = (f'float {report.float_psnr:.2f} dB against ground truth' if use_drop
                 else 'fidelity to the float output')
    ax.set_title(title or f'one layer quantized ({label}), the others float; {reference}'
                 + ('' if not any(infinite) else '; hatched: output unchanged'), fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), fontsize=7, loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def allocate_bits(reports: Mapping[int, SensitivityReport], budget: float, weighting: str = 'params'
                  ) -> Dict[str, int]:
    """Bits per layer minimising the summed error increases under an average bit budget.

    Args:
        reports: Per bit width, a sensitivity report of the same layers at that width.
        budget: The average bits allowed (averaged over layers weighted by ``weighting``).
        weighting: ``params`` (each layer counts by its number of weights) or ``layers`` (equally).

    Errors of separately quantized layers add up roughly in squared error (not in dB), so the sum of
    ``error`` is minimised. Starts every layer at the smallest width and repeatedly gives one more
    step of width to the layer with the largest error reduction per unit of budget while it fits.
    """
    if weighting not in ('params', 'layers'):
        raise ConfigError(f"weighting must be 'params' or 'layers', got {weighting!r}")
    widths = sorted(reports)
    if not widths:
        raise ValueError('allocate_bits needs at least one sensitivity report')
    by_name = {w: {layer.name: layer for layer in reports[w].layers} for w in widths}
    names = [layer.name for layer in reports[widths[0]].layers]
    size = {n: (by_name[widths[0]][n].num_weights if weighting == 'params' else 1) for n in names}
    total = sum(size.values())
    if budget < widths[0]:
        raise ConfigError(f'the bit budget {budget} is below the smallest width offered ({widths[0]})')
    level = {n: 0 for n in names}
    used = widths[0] * total
    while True:
        best, best_gain = None, 0.0
        for n in names:
            if level[n] + 1 >= len(widths):
                continue
            now, nxt = widths[level[n]], widths[level[n] + 1]
            cost = (nxt - now) * size[n]
            if used + cost > budget * total + 1e-9:
                continue
            gain = (by_name[now][n].error - by_name[nxt][n].error) / cost
            if best is None or gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            break
        used += (widths[level[best] + 1] - widths[level[best]]) * size[best]
        level[best] += 1
    return {n: widths[level[n]] for n in names}


@dataclass
class AllocationResult:
    """A mixed-precision allocation and its fidelity PSNR against uniform bits at the same budget."""

    budget: float
    weighting: str
    allocation: Dict[str, int]
    uniform_psnr: float
    allocated_psnr: float
    average_bits: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def average_bits(allocation: Mapping[str, int], qmodel: nn.Module, weighting: str) -> float:
    sizes = {n: (layer.weight.numel() if weighting == 'params' else 1) for n, layer in quant_layers(qmodel)}
    total = sum(sizes[n] for n in allocation)
    return sum(bits * sizes[n] for n, bits in allocation.items()) / max(total, 1)


def sensitivity_allocation(fp_model: nn.Module, calib, holdout_lr: Sequence[torch.Tensor], config: OAQConfig,
                           crop_border: int, progress: bool = False,
                           analysis: Optional[AnalysisConfig] = None) -> AllocationResult:
    """Allocate bits among the body layers from their sensitivity, and measure it against uniform bits.

    Both quantized models run the whole pipeline of ``config`` on ``calib``; the allocation is chosen
    and both are measured by fidelity PSNR (against the float output) on ``holdout_lr``, LR crops held
    out of the calibration data. Weight and activation bits of a layer move together; the budget is the
    configured body width (``config.w_bits``), over the body layers; the widths offered and the budget
    weighting are ``analysis.allocation_offsets`` and ``allocation_weighting`` (the defaults when ``None``).
    """
    analysis = analysis if analysis is not None else AnalysisConfig()
    from ..run import run_pipeline

    start = time.perf_counter()
    if config.w_bits != config.a_bits:
        raise ConfigError('the bit allocation moves weight and activation bits together; it needs '
                          f'w_bits == a_bits, got W{config.w_bits}A{config.a_bits}')
    pairs = fidelity_pairs(fp_model, holdout_lr)
    uniform = run_pipeline(fp_model, calib, config, progress=progress)
    uniform_psnr = mean_psnr(uniform.model, pairs, crop_border)
    body = [n for n, layer in quant_layers(uniform.model) if layer.role == 'body'
            and layer.weight_quantizer.bits == config.w_bits]
    weighting = analysis.allocation_weighting
    widths = sorted({min(MAX_BITS, max(MIN_BITS, config.w_bits + o)) for o in analysis.allocation_offsets})
    reports = {w: layer_sensitivity(uniform.model, pairs, crop_border, reference='fp', bits=w, names=body,
                                    progress=progress) for w in widths}
    allocation = allocate_bits(reports, float(config.w_bits), weighting)
    overrides = dict(config.layer_bits)
    overrides.update({name: [bits, bits] for name, bits in allocation.items()})
    mixed = run_pipeline(fp_model, calib, config.replace(layer_bits=overrides), progress=progress)
    return AllocationResult(budget=float(config.w_bits), weighting=weighting, allocation=allocation,
                            uniform_psnr=uniform_psnr, allocated_psnr=mean_psnr(mixed.model, pairs, crop_border),
                            average_bits=average_bits(allocation, uniform.model, weighting),
                            seconds=time.perf_counter() - start)
