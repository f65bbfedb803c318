"""Uniform activation quantizers, the baselines (docs/METHOD.md, Uniform baselines): MinMax, Percentile and
MSE clips."""
from __future__ import annotations

import torch

from ..config import UNIFORM_METHODS
from .activation import ActivationQuantizer
from .observer import ObservedStats
from .region_grid import RegionGrid, endpoint_region

MSE_SHRINK_STEPS = 50


class UniformQuantizer(ActivationQuantizer):
    """2^b levels evenly spread over ``[lower, upper]`` (asymmetric, endpoints included).

    Args:
        bits: Activation bits b.
        method: Initial range: ``minmax`` (observed min/max), ``percentile`` (the 100-p and p
            percentiles), ``mse`` (the min/max range shrunk to the least quantization error on the
            observed sample).
        **kwargs: Observer settings (see :class:`ActivationQuantizer`).
    """

    def __init__(self, bits: int, method: str = 'minmax', **kwargs) -> None:
        super().__init__(bits, **kwargs)
        if method not in UNIFORM_METHODS:
            raise ValueError(f'method must be one of {UNIFORM_METHODS}, got {method!r}')
        self.method = method

    def _initialize_from(self, stats: ObservedStats, sample: torch.Tensor) -> None:
        if self.method == 'percentile':
            self.set_bounds(stats.quantile_low, stats.quantile_high)
        elif self.method == 'mse':
            self.set_bounds(*mse_clip(sample, stats.minimum, stats.maximum, self.bits))
        else:
            self.set_bounds(stats.minimum, stats.maximum)

    def parameter_grid(self) -> RegionGrid:
        return RegionGrid(middle=endpoint_region(self.lower, self.upper, 2 ** self.bits))

    def describe(self) -> dict:
        info = super().describe()
        info['method'] = self.method
        return info


def mse_clip(sample: torch.Tensor, minimum: float, maximum: float, bits: int) -> tuple:
    """The range ``alpha * [min, max]`` (alpha in (0, 1]) with the least squared error on ``sample``."""
    if sample.numel() == 0 or maximum <= minimum:
        return minimum, maximum
    best = (float('inf'), minimum, maximum)
    for step in range(MSE_SHRINK_STEPS):
        alpha = 1.0 - step / MSE_SHRINK_STEPS
        low, high = torch.tensor(minimum * alpha), torch.tensor(maximum * alpha)
        grid = RegionGrid(middle=endpoint_region(low, high, 2 ** bits))
        error = float(((grid.quantize(sample) - sample) ** 2).mean())
        if error < best[0]:
            best = (error, float(low), float(high))
    return best[1], best[2]
