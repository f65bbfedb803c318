"""The base of activation quantizers: learnable bounds, an observer, fake quantization by a grid."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .observer import ActivationObserver, ObservedStats
from .region_grid import RegionGrid


class ActivationQuantizer(nn.Module):
    """Per-tensor activation quantizer with learnable ``lower``/``upper`` bounds.

    Subclasses define :meth:`grid` (the levels for the current parameters) and :meth:`initialize`
    (parameters from the observed statistics).

    Args:
        bits: Code width.
        percentile: Percentile used by the observer's upper quantile.
        sample_size: Values the observer keeps.
        seed: Observer sampling seed.
    """

    def __init__(self, bits: int, percentile: float = 99.0, sample_size: int = 65536, seed: int = 0) -> None:
        super().__init__()
        self.bits = int(bits)
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.observer: Optional[ActivationObserver] = ActivationObserver(percentile, sample_size, seed)
        self.observed: Optional[ObservedStats] = None

    def observe(self, x: torch.Tensor, index: Optional[int] = None) -> None:
        """Feed one calibration batch to the statistics."""
        if self.observer is None:
            raise RuntimeError('this quantizer was already initialized; call reset_observer() to recalibrate')
        self.observer.observe(x, index)

    def reset_observer(self) -> None:
        self.observer = ActivationObserver(self.observer.percentile if self.observer else 99.0)

    def initialize(self, beta: float = 0.9) -> None:
        """Set the parameters from the observed statistics (EMA factor ``beta``)."""
        self.observed = self.observer.stats(beta)
        self._initialize_from(self.observed, self.observer.sample())

    def _initialize_from(self, stats: ObservedStats, sample: torch.Tensor) -> None:
        raise NotImplementedError

    def set_bounds(self, lower: float, upper: float) -> None:
        with torch.no_grad():
            self.lower.fill_(float(lower))
            self.upper.fill_(float(upper))

    def grid(self) -> RegionGrid:
        raise NotImplementedError

    @property
    def num_codes(self) -> int:
        return self.grid().num_codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid().quantize(x)

    def outlier_fraction(self, x: torch.Tensor) -> float:
        """Fraction of values outside the middle region (0 for a single-region grid)."""
        grid = self.grid()
        with torch.no_grad():
            outside = torch.zeros_like(x, dtype=torch.bool)
            if grid.low is not None:
                outside |= x < grid.low_threshold
            if grid.high is not None:
                outside |= x > grid.high_threshold
            return float(outside.float().mean())

    def describe(self) -> dict:
        """Parameters as plain numbers, for reports."""
        return {'kind': type(self).__name__, 'bits': self.bits, 'lower': float(self.lower.detach()),
                'upper': float(self.upper.detach()), 'breakpoint': None, 'num_codes': self.num_codes}

    def extra_repr(self) -> str:
        return f'bits={self.bits}, lower={float(self.lower.detach()):.4g}, upper={float(self.upper.detach()):.4g}'


def activation_quantizers(model: nn.Module) -> List[Tuple[str, ActivationQuantizer]]:
    """``(name, quantizer)`` for every activation quantizer of ``model`` (of layers and of attention matmuls)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)]
