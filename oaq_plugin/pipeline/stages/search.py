"""Search stage: per layer, the breakpoint, activation bounds and weight clips that minimise the error
of the layer's output on calibration data, replacing the fixed-percentile initialization.

Each layer is searched on its own captured inputs (windows of ``num_samples`` calibration patches):
the error is the mean squared difference between the layer's output with its quantized input and
weight and its float output on the float input. Parameters are searched one at a time (coordinate
descent) on a coarse grid refined around the best point; a candidate is kept only when it lowers the
error, so the searched layer is never worse than its initialization on the captured data.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...config import OAQConfig
from ...quant.activation import ActivationQuantizer
from ...quant.dual_region import DualRegionQuantizer
from ...quant.fast_fake_quant import lookup_quantizer
from ...quant.layers import QuantLayer, quant_layers
from ..capture.layer_capture import execution_order, layer_input_windows
from .base import Record, Stage, StageContext, Unit, UnitReport, calibration_samples, unit_by_unit

# Breakpoints are searched on a log scale between this fraction of max(|lower|, upper) and the full
# range (where the quantizer becomes a plain uniform grid, which the search may then pick).
BREAKPOINT_MIN_RATIO = 1.0 / 128
# Activation bounds may shrink to this fraction of the observed extreme; tails carry colour, so the
# search decides by the output error how much of them to keep.
BOUND_MIN_RATIO = 0.05
# Weight clips are searched between this fraction of the channel's max |W| and max |W|.
WEIGHT_CLIP_MIN_RATIO = 0.2
# Levels per tail tried by the level-split search, as fractions of all codes (the paper: 1/4).
LEVEL_SPLIT_TAIL_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 7 / 16)


# Output energies below this count as this when errors are made relative to them (all-zero outputs).
MIN_OUTPUT_ENERGY = 1e-12


def relative_error(error, output_energy: float):
    """A layer's output error (a float or a tensor) relative to the energy of its float output."""
    return error / max(output_energy, MIN_OUTPUT_ENERGY)


@dataclass
class LayerSearch(Record):
    """Initial and searched parameters of one layer, and its output error before and after."""

    name: str
    kind: str
    w_bits: int
    a_bits: int
    initial: Dict[str, Optional[float]]
    searched: Dict[str, Optional[float]]
    error_initial: float
    error_searched: float
    output_energy: float

    @property
    def reduction(self) -> float:
        """Fraction of the initial output error the search removed (0 when it found nothing better)."""
        if self.error_initial <= 0:
            return 0.0
        return 1.0 - self.error_searched / self.error_initial

    def derived(self) -> dict:
        return {'error_reduction': self.reduction}


@dataclass
class SearchReport(UnitReport):
    """What the search changed, per layer, and how long it took."""

    layers: List[LayerSearch] = field(default_factory=list)
    seconds: float = 0.0
    sequential: bool = False
    num_samples: int = 0

    def derived(self) -> dict:
        return {
            'relative_error_initial': sum(relative_error(layer.error_initial, layer.output_energy)
                                          for layer in self.layers),
            'relative_error_searched': sum(relative_error(layer.error_searched, layer.output_energy)
                                           for layer in self.layers),
        }

    def summary(self) -> str:
        """A short table: per layer the breakpoint before/after and the output error reduction."""
        lines = [f"{'layer':32s} {'bp init':>9s} {'bp':>9s} {'err init':>10s} {'err':>10s} {'gain':>6s}"]
        for layer in self.layers:
            bp0, bp1 = layer.initial.get('breakpoint'), layer.searched.get('breakpoint')
            fmt = (lambda v: f'{v:9.4g}' if v is not None else f"{'-':>9s}")
            lines.append(f'{layer.name[:32]:32s} {fmt(bp0)} {fmt(bp1)} {layer.error_initial:10.4g} '
                         f'{layer.error_searched:10.4g} {100 * layer.reduction:5.1f}%')
        lines.append(f'search: {len(self.layers)} layers in {self.seconds:.1f} s')
        return '\n'.join(lines)


class LayerProblem:
    """The output error of one layer on its captured inputs, as a function of its quantizer parameters.

    Args:
        layer: The quantized layer (its parameters are changed in place while searching).
        inputs: What the layer sees in the network being built (float inputs, or the inputs of the
            partly quantized network under sequential search).
        float_inputs: The float network's inputs of the layer at the same windows; the target is the
            float layer applied to them.
    """

    def __init__(self, layer: QuantLayer, inputs: torch.Tensor, float_inputs: torch.Tensor) -> None:
        self.layer = layer
        self.inputs = inputs
        with torch.no_grad():
            self.target = layer.float_op(float_inputs, layer.weight)
        self.output_energy = float(self.target.pow(2).mean())
        self.channel_dim = 1 if self.target.dim() == 4 else self.target.dim() - 1
        self._quantized_inputs: Optional[torch.Tensor] = None

    def channel_errors(self, quantized_inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Mean squared output error of each output channel."""
        out = self.layer.float_op(quantized_inputs, weight)
        dims = [d for d in range(out.dim()) if d != self.channel_dim]
        return (out - self.target).pow(2).mean(dim=dims)

    def quantized_inputs(self) -> torch.Tensor:
        if self._quantized_inputs is None:
            self._quantized_inputs = lookup_quantizer(self.layer.act_quantizer.grid())(self.inputs)
        return self._quantized_inputs

    def forget_inputs(self) -> None:
        """Call after changing the activation quantizer."""
        self._quantized_inputs = None

    def error(self) -> float:
        """Output error with the layer's current parameters."""
        weight = self.layer.quantized_weight()
        return float(self.channel_errors(self.quantized_inputs(), weight).mean())


def _candidates(low: float, high: float, count: int, log: bool) -> List[float]:
    if high <= low:
        return [low]
    if log and low > 0:
        ratio = (high / low) ** (1.0 / max(count - 1, 1))
        return [low * ratio ** i for i in range(count)]
    return [low + (high - low) * i / max(count - 1, 1) for i in range(count)]


def minimize_scalar(evaluate: Callable[[float], float], current: float, current_error: float, low: float,
                    high: float, grid_size: int, refine_rounds: int, log: bool = False) -> Tuple[float, float]:
    """Grid search of one parameter, then ``refine_rounds`` halvings of the spacing around the best point.

    Returns ``(value, error)``; the current value is kept unless a candidate has a lower error.
    """
    best_value, best_error = current, current_error
    for value in _candidates(low, high, grid_size, log):
        error = evaluate(value)
        if error < best_error:
            best_value, best_error = value, error
    if high <= low or grid_size < 2:
        return best_value, best_error
    # The spacing of the coarse grid, as a ratio (log grid) or a difference (linear grid).
    spacing = (high / low) ** (1.0 / (grid_size - 1)) if log and low > 0 else (high - low) / (grid_size - 1)
    for _ in range(refine_rounds):
        spacing = math.sqrt(spacing) if log and low > 0 else spacing / 2
        centre = best_value
        neighbours = (centre / spacing, centre * spacing) if log and low > 0 else (centre - spacing,
                                                                                  centre + spacing)
        for value in neighbours:
            if low <= value <= high:
                error = evaluate(value)
                if error < best_error:
                    best_value, best_error = value, error
    return best_value, best_error


def _act_state(quantizer: ActivationQuantizer) -> Dict[str, Optional[float]]:
    state = {'lower': float(quantizer.lower.detach()), 'upper': float(quantizer.upper.detach()),
             'breakpoint': None, 'dense_share': None}
    if isinstance(quantizer, DualRegionQuantizer):
        state['breakpoint'] = float(quantizer.breakpoint.detach())
        state['dense_center'] = float(quantizer.dense_center)
        share = float(quantizer.dense_share)
        state['dense_share'] = None if math.isnan(share) else share
        state['dense_levels'], state['tail_levels'] = quantizer.counts()
    return state


def _layer_state(layer: QuantLayer) -> Dict[str, Optional[float]]:
    state = _act_state(layer.act_quantizer)
    clip = layer.weight_quantizer.clip.detach().reshape(-1)
    state['weight_clip_mean'] = float(clip.mean())
    state['weight_clip_max'] = float(clip.max())
    return state


class _LayerSearcher:
    """Coordinate descent over one layer's parameters."""

    def __init__(self, problem: LayerProblem, config: OAQConfig) -> None:
        self.problem = problem
        self.layer = problem.layer
        self.quantizer = problem.layer.act_quantizer
        self.settings = config.search
        self.error = problem.error()

    def _set_and_score(self, setter: Callable[[float], None]) -> Callable[[float], float]:
        def evaluate(value: float) -> float:
            setter(value)
            self.problem.forget_inputs()
            return self.problem.error()
        return evaluate

    def _search_param(self, getter, setter, low: float, high: float, log: bool) -> None:
        current = getter()
        value, error = minimize_scalar(self._set_and_score(setter), current, self.error, low, high,
                                       self.settings.grid_size, self.settings.refine_rounds, log)
        setter(value)
        self.problem.forget_inputs()
        self.error = error

    def _extent(self) -> float:
        return max(abs(float(self.quantizer.lower.detach())), abs(float(self.quantizer.upper.detach())), 1e-12)

    def search_breakpoint(self) -> None:
        q = self.quantizer
        extent = self._extent()
        self._search_param(lambda: float(q.breakpoint.detach()), q.set_breakpoint,
                           extent * BREAKPOINT_MIN_RATIO, extent, log=True)

    def search_center(self, low: float, high: float) -> None:
        """The centre of the dense region, between the observed 1st and 99th percentiles."""
        q = self.quantizer
        self._search_param(lambda: float(q.dense_center), q.set_center, min(low, 0.0), max(high, 0.0), log=False)

    def search_bounds(self, observed_lower: float, observed_upper: float) -> None:
        q = self.quantizer
        upper_now = float(q.upper.detach())
        if observed_lower < 0:
            self._search_param(lambda: float(q.lower.detach()),
                               lambda v: q.set_bounds(v, float(q.upper.detach())),
                               observed_lower, min(observed_lower * BOUND_MIN_RATIO, upper_now), log=False)
        if observed_upper > 0:
            lower_now = float(q.lower.detach())
            self._search_param(lambda: float(q.upper.detach()),
                               lambda v: q.set_bounds(float(q.lower.detach()), v),
                               max(observed_upper * BOUND_MIN_RATIO, lower_now), observed_upper, log=False)

    def search_level_split(self) -> None:
        """Try splits of the codes between dense region and tails, each with its best breakpoint."""
        q = self.quantizer
        dense, tail = q.counts()
        total = dense + 2 * tail
        best = (self.error, float(q.dense_share), float(q.breakpoint.detach()))
        tails_options = sorted({min(max(1, round(total * f)), (total - 2) // 2) for f in LEVEL_SPLIT_TAIL_FRACTIONS})
        for tails in tails_options:
            share = (total - 2 * tails) / total
            q.dense_share.fill_(share)
            self.problem.forget_inputs()
            self.error = self.problem.error()
            self.search_breakpoint()
            if self.error < best[0]:
                best = (self.error, share, float(q.breakpoint.detach()))
        q.dense_share.fill_(best[1])
        q.set_breakpoint(best[2])
        self.problem.forget_inputs()
        self.error = best[0]

    def search_weight_clip(self) -> None:
        """Per clip group (channel or tensor), the clip with the least output error of its channels."""
        wq = self.layer.weight_quantizer
        weight = self.layer.weight.detach()
        quantized_inputs = self.problem.quantized_inputs()
        abs_max = wq._abs_max(weight).clamp_min(1e-12)
        current = wq.clip.detach().clone()

        def group_errors(clip: torch.Tensor) -> torch.Tensor:
            errors = self.problem.channel_errors(quantized_inputs, wq.quantize_with(weight, clip))
            if wq.granularity == 'tensor':
                return errors.mean().reshape(1)
            return errors

        shape = current.shape
        best_clip = current.reshape(-1).clone()
        best_error = group_errors(current)
        low = (abs_max * WEIGHT_CLIP_MIN_RATIO).reshape(-1)
        high = abs_max.reshape(-1).clone()
        size = self.settings.grid_size
        spacing = (high - low) / max(size - 1, 1)
        candidates = [low + spacing * i for i in range(size)]
        for _ in range(self.settings.refine_rounds + 1):
            for clip in candidates:
                clip = torch.minimum(torch.maximum(clip, low), high)
                errors = group_errors(clip.reshape(shape))
                better = errors < best_error
                best_error = torch.where(better, errors, best_error)
                best_clip = torch.where(better, clip, best_clip)
            spacing = spacing / 2
            candidates = [best_clip - spacing, best_clip + spacing]
        wq.set_clip(best_clip.reshape(shape))
        self.error = min(self.error, self.problem.error())

    def run(self, observed: Dict[str, float]) -> None:
        s = self.settings
        dual = isinstance(self.quantizer, DualRegionQuantizer)
        for _ in range(max(1, s.sweeps)):
            if dual and s.level_split:
                self.search_level_split()
            elif dual and s.breakpoint:
                self.search_breakpoint()
            if dual and s.center:
                self.search_center(observed['quantile_low'], observed['quantile_high'])
                if s.breakpoint:
                    self.search_breakpoint()
            if s.act_clip:
                self.search_bounds(observed['minimum'], observed['maximum'])
                if dual and s.breakpoint:
                    self.search_breakpoint()
            if s.weight_clip:
                self.search_weight_clip()


def _searched_layers(qmodel: nn.Module, example: torch.Tensor) -> List[Tuple[str, QuantLayer]]:
    layers = dict(quant_layers(qmodel))
    return [(name, layers[name]) for name in execution_order(qmodel, example)]


class SearchStage(Stage):
    """The search, layer by layer in execution order; resumable before any layer."""

    name = 'search'
    report_type = SearchReport

    def run(self, context: StageContext) -> SearchReport:
        qmodel, config = context.qmodel, context.config
        settings = config.search
        samples = calibration_samples(context.batches, settings.num_samples, 'the search')
        report = SearchReport(sequential=settings.sequential, num_samples=int(samples.shape[0]))

        def units(finished: AbstractSet[str]) -> Tuple[int, Iterator[Unit]]:
            ordered = _searched_layers(qmodel, samples[:1].to(next(qmodel.parameters()).device))
            names = [name for name, _ in ordered]
            layers = dict(ordered)
            # Quantized attention matmuls are not searched; they too go to float while inputs are captured.
            windows = layer_input_windows(qmodel, samples, names, settings.window, settings.seed,
                                          settings.sequential, settings.memory_mb, skip=finished)

            def pending() -> Iterator[Unit]:
                with contextlib.closing(windows):
                    for name, inputs, float_inputs in windows:
                        yield name, functools.partial(_search_layer, name, layers[name], inputs, float_inputs,
                                                      config)
            return len(names), pending()
        return unit_by_unit(context, report, units, desc='search', unit='layer')


def search(qmodel: nn.Module, batches: Sequence[torch.Tensor], config: OAQConfig,
           progress: bool = False) -> SearchReport:
    """Search every quantized layer's breakpoint, activation bounds and weight clips in place.

    A layer's search depends only on its captured windows (seeded by its name) and on the layers before it.

    Args:
        qmodel: A converted and calibrated model.
        batches: The calibration batches (N, C, H, W); the first ``config.search.num_samples`` samples
            are used.
        config: The method's configuration (``config.search`` chooses what is searched).
        progress: Show a progress bar over the layers.

    Returns:
        A :class:`SearchReport` with the initial and searched values of every layer.
    """
    return SearchStage().run(StageContext(qmodel=qmodel, batches=batches, config=config, progress=progress))


def _search_layer(name: str, layer: QuantLayer, inputs: torch.Tensor, float_inputs: torch.Tensor,
                  config: OAQConfig) -> LayerSearch:
    layer.set_mode('quant')
    quantizer = layer.act_quantizer
    initial = _layer_state(layer)
    stats = quantizer.observed
    if stats is not None:
        observed = {'minimum': stats.minimum, 'maximum': stats.maximum, 'quantile_low': stats.quantile_low,
                    'quantile_high': stats.quantile_high}
    else:
        observed = {'minimum': initial['lower'], 'maximum': initial['upper'],
                    'quantile_low': initial['lower'], 'quantile_high': initial['upper']}
    with torch.no_grad():
        problem = LayerProblem(layer, inputs, float_inputs)
        searcher = _LayerSearcher(problem, config)
        error_initial = searcher.error
        searcher.run(observed)
    return LayerSearch(name=name, kind=type(layer.module).__name__, w_bits=layer.weight_quantizer.bits,
                       a_bits=quantizer.bits, initial=initial, searched=_layer_state(layer),
                       error_initial=error_initial, error_searched=searcher.error,
                       output_energy=problem.output_energy)
