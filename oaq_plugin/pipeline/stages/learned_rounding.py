"""Learned weight rounding (AdaRound-style), layer by layer, after the search.

Rounding every weight to its nearest level minimises the weight error, not the layer's output error.
Here each weight may instead round down or up: a continuous variable ``V`` per weight gives a soft
choice ``h(V)`` in [0, 1] (a sigmoid stretched to (-0.1, 1.1) and clipped), the soft weight
``(floor(position) + h(V) - zero_point) * step`` is trained with Adam to make the layer's output on its
captured inputs (quantized by its activation quantizer) match the float layer's output on float inputs,
and a regulariser ``1 - |2h - 1|^beta``, with ``beta`` annealed from 20 to 2 after a warm-up, drives every
choice to 0 or 1. The choices are then hardened (``h >= 0.5`` rounds up) and kept only when they lower the
layer's output error on the captured data below round-to-nearest; the clip and the activation quantizer
are not changed.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import AbstractSet, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...config import OAQConfig, RoundingConfig
from ...errors import NumericalError
from ...quant.layers import QuantLayer, quant_layers
from ...quant.region_grid import MIN_STEP
from ...quant.seeding import seeded_generator
from ..capture.layer_capture import execution_order, layer_input_windows
from .base import Record, Stage, StageContext, Unit, UnitReport, calibration_samples, unit_by_unit
from .search import LayerProblem, relative_error

# The stretched sigmoid of AdaRound: h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1).
ZETA, GAMMA = 1.1, -0.1
# The regulariser's exponent is annealed linearly from BETA_START to BETA_END after the warm-up.
BETA_START, BETA_END = 20.0, 2.0


def soft_choice(variables: torch.Tensor) -> torch.Tensor:
    """``h(V)`` in [0, 1]: how far each weight rounds up from the floor of its grid position."""
    return torch.clamp(torch.sigmoid(variables) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_variables(fraction: torch.Tensor) -> torch.Tensor:
    """The ``V`` whose ``h(V)`` is ``fraction`` (the weight's unrounded offset above the floor)."""
    p = ((fraction - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def regulariser(choice: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of ``1 - |2h - 1|^beta``: 0 when every choice is 0 or 1, largest at 1/2."""
    return (1 - (2 * choice - 1).abs().pow(beta)).mean()


def beta_at(iteration: int, iterations: int, warmup: float) -> Optional[float]:
    """The regulariser's exponent at ``iteration`` (``None`` during the warm-up: no regulariser)."""
    start = int(warmup * iterations)
    if iteration < start:
        return None
    progress = (iteration - start) / max(iterations - start - 1, 1)
    return BETA_START + (BETA_END - BETA_START) * progress


@dataclass
class LayerRounding(Record):
    """Output error of one layer with nearest and learned rounding, and what was kept."""

    name: str
    w_bits: int
    error_nearest: float
    error_learned: float
    output_energy: float
    flipped: float
    kept: bool

    @property
    def reduction(self) -> float:
        """Fraction of the nearest-rounding error removed (0 when the learned rounding was not kept)."""
        if not self.kept or self.error_nearest <= 0:
            return 0.0
        return 1.0 - self.error_learned / self.error_nearest

    def derived(self) -> dict:
        return {'error_reduction': self.reduction}


@dataclass
class RoundingReport(UnitReport):
    """Per layer, what learned rounding changed; and how long it took."""

    layers: List[LayerRounding] = field(default_factory=list)
    seconds: float = 0.0

    def derived(self) -> dict:
        nearest = sum(relative_error(layer.error_nearest, layer.output_energy) for layer in self.layers)
        kept = sum(relative_error(layer.error_learned if layer.kept else layer.error_nearest, layer.output_energy)
                   for layer in self.layers)
        return {'relative_error_nearest': nearest, 'relative_error_learned': kept}

    def summary(self) -> str:
        lines = [f"{'layer':32s} {'err nearest':>12s} {'err learned':>12s} {'flipped':>8s} {'kept':>5s}"]
        for layer in self.layers:
            lines.append(f'{layer.name[:32]:32s} {layer.error_nearest:12.4g} {layer.error_learned:12.4g} '
                         f'{100 * layer.flipped:7.1f}% {"yes" if layer.kept else "no":>5s}')
        kept = sum(layer.kept for layer in self.layers)
        lines.append(f'learned rounding: kept in {kept} of {len(self.layers)} layers, {self.seconds:.1f} s')
        return '\n'.join(lines)


def learn_layer_rounding(name: str, layer: QuantLayer, inputs: torch.Tensor, float_inputs: torch.Tensor,
                         settings: RoundingConfig) -> LayerRounding:
    """Learn the rounding of ``layer``'s weight on its captured inputs and set it when it helps."""
    layer.set_mode('quant')
    quantizer = layer.weight_quantizer
    quantizer.set_rounding(None)
    weight = layer.weight.detach()
    with torch.no_grad():
        problem = LayerProblem(layer, inputs, float_inputs)
        quantized_inputs = problem.quantized_inputs()
        error_nearest = problem.error()
        clip = torch.clamp(quantizer.clip.detach(), min=MIN_STEP)
        step = quantizer.step(clip)
        position = quantizer.grid_position(weight, clip)
        floor = torch.floor(position)
    variables = nn.Parameter(initial_variables(position - floor))
    optimizer = torch.optim.Adam([variables], lr=settings.lr)
    generator = seeded_generator(settings.seed, name)
    count = quantized_inputs.shape[0]
    # Convolution inputs are (windows, C, h, w); token inputs (Linear) are rows, window^2 per sample.
    per_sample = 1 if quantized_inputs.dim() == 4 else settings.window ** 2
    batch = min(settings.batch_size * per_sample, count)
    top = quantizer.num_levels - 1
    with torch.enable_grad():
        for iteration in range(settings.iterations):
            picks = torch.randperm(count, generator=generator)[:batch]
            choice = soft_choice(variables)
            soft_weight = (torch.clamp(floor + choice, 0, top) - quantizer.zero_point) * step
            out = layer.float_op(quantized_inputs[picks], soft_weight)
            loss = relative_error((out - problem.target[picks]).pow(2).mean(), problem.output_energy)
            beta = beta_at(iteration, settings.iterations, settings.warmup)
            if beta is not None:
                loss = loss + settings.reg_weight * regulariser(choice, beta)
            if not torch.isfinite(loss):
                raise NumericalError(f"learned rounding produced NaN/Inf in layer '{name}' at iteration "
                                     f'{iteration}; lower rounding.lr')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        learned = (soft_choice(variables) >= 0.5).to(torch.uint8)
        nearest = (torch.round(position) > floor)
        flipped = float((learned.bool() != nearest).float().mean())
        quantizer.set_rounding(learned)
        error_learned = problem.error()
        kept = error_learned < error_nearest
        if not kept:
            quantizer.set_rounding(None)
    return LayerRounding(name=name, w_bits=quantizer.bits, error_nearest=error_nearest,
                         error_learned=error_learned, output_energy=problem.output_energy, flipped=flipped,
                         kept=bool(kept))


class RoundingStage(Stage):
    """Learned rounding, layer by layer in execution order; resumable before any layer."""

    name = 'rounding'
    report_type = RoundingReport

    def run(self, context: StageContext) -> RoundingReport:
        qmodel = context.qmodel
        settings = context.config.rounding
        samples = calibration_samples(context.batches, settings.num_samples, 'learned rounding')

        def units(finished: AbstractSet[str]) -> Tuple[int, Iterator[Unit]]:
            names = execution_order(qmodel, samples[:1].to(next(qmodel.parameters()).device))
            layers = dict(quant_layers(qmodel))
            windows = layer_input_windows(qmodel, samples, names, settings.window, settings.seed,
                                          settings.sequential, settings.memory_mb, skip=finished)

            def pending() -> Iterator[Unit]:
                with contextlib.closing(windows):
                    for name, inputs, float_inputs in windows:
                        yield name, functools.partial(learn_layer_rounding, name, layers[name], inputs, float_inputs,
                                                      settings)
            return len(names), pending()
        return unit_by_unit(context, RoundingReport(), units, desc='rounding', unit='layer')


def learn_rounding(qmodel: nn.Module, batches: Sequence[torch.Tensor], config: OAQConfig,
                   progress: bool = False) -> RoundingReport:
    """Learn the weight rounding of every quantized layer of ``qmodel`` in place, in execution order.

    Args:
        qmodel: A converted, calibrated (and usually searched) model.
        batches: The calibration batches; the first ``config.rounding.num_samples`` samples are used.
        config: The method's configuration (``config.rounding``).
        progress: Show a progress bar over the layers.
    """
    return RoundingStage().run(StageContext(qmodel=qmodel, batches=batches, config=config, progress=progress))
