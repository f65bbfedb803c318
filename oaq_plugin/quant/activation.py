"""The base of activation quantizers: learnable bounds, an observer, fake quantization by a grid."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import CalibConfig
from .fast_fake_quant import fast_quantize
from .forward_hooks import forward_hooks
from .integer_lattice import to_lattice
from .observer import ActivationObserver, ObservedStats
from .region_grid import RegionGrid


class ActivationQuantizer(nn.Module):
    """Per-tensor activation quantizer with learnable ``lower``/``upper`` bounds.

    Subclasses define :meth:`parameter_grid` (the levels for the current parameters) and :meth:`initialize`
    (parameters from the observed statistics); :meth:`grid` is that grid, snapped onto an integer lattice
    when ``integer_lattice`` is set.

    Args:
        bits: Code width.
        percentile: Percentile used by the observer's upper quantile.
        sample_size: Values the observer keeps.
        seed: Observer sampling seed.
        integer_lattice: Put every grid on an integer lattice (:func:`~oaq_plugin.quant.integer_lattice.to_lattice`);
            off for a bare quantizer, set from ``OAQConfig.integer_lattice`` by the conversion.
    """

    # The switch of the fast fake quantization used while training (see :func:`fast_fake_quantization`).
    fast = False

    def __init__(self, bits: int, percentile: float = CalibConfig.percentile,
                 sample_size: int = CalibConfig.sample_size, seed: int = CalibConfig.seed,
                 integer_lattice: bool = False) -> None:
        super().__init__()
        self.bits = int(bits)
        self.integer_lattice = bool(integer_lattice)
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.observer = ActivationObserver(percentile, sample_size, seed)
        self.observed: Optional[ObservedStats] = None

    def observe(self, x: torch.Tensor, index: Optional[int] = None) -> None:
        """Feed one calibration batch to the statistics."""
        self.observer.observe(x, index)

    def initialize(self, beta: float = CalibConfig.ema_beta) -> None:
        """Set the parameters from the observed statistics (EMA factor ``beta``)."""
        self.observed = self.observer.stats(beta)
        self._initialize_from(self.observed, self.observer.sample())

    def _initialize_from(self, stats: ObservedStats, sample: torch.Tensor) -> None:
        raise NotImplementedError

    def set_bounds(self, lower: float, upper: float) -> None:
        with torch.no_grad():
            self.lower.fill_(float(lower))
            self.upper.fill_(float(upper))

    def parameter_grid(self) -> RegionGrid:
        raise NotImplementedError

    def grid(self) -> RegionGrid:
        """The grid every stage and backend quantizes with."""
        grid = self.parameter_grid()
        return to_lattice(grid) if self.integer_lattice else grid

    @property
    def num_codes(self) -> int:
        return self.grid().num_codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x._is_view():
            # The backward keeps the input; a network that later writes into the tensor this view belongs
            # to (in-place partial convolutions, eval-mode channel splits) would invalidate it.
            x = x.clone()
        if self.fast:
            return fast_quantize(self.grid(), x)
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


@contextlib.contextmanager
def fast_fake_quantization(model: nn.Module) -> Iterator[None]:
    """While active, the activation quantizers of ``model`` (attention matmul operands included) quantize
    with :func:`~oaq_plugin.quant.fast_fake_quant.fast_quantize`; each one's previous setting comes back
    on exit."""
    quantizers = [quantizer for _, quantizer in activation_quantizers(model)]
    previous = [quantizer.fast for quantizer in quantizers]
    for quantizer in quantizers:
        quantizer.fast = True
    try:
        yield
    finally:
        for quantizer, fast in zip(quantizers, previous):
            quantizer.fast = fast


def dropped_quantization(quantizers: Sequence[Tuple[str, nn.Module]], probability: float,
                         generator: torch.Generator) -> contextlib.AbstractContextManager:
    """While active, each of ``quantizers`` passes a random ``probability`` of its input values unquantized
    (drawn from ``generator``; QDrop, Wei et al. 2022): trained weights then see a random mix of quantized and
    float activations. ``probability`` 0 changes nothing."""
    if probability <= 0:
        return contextlib.nullcontext()

    def drop(name: str, quantizer: nn.Module, args, quantized: torch.Tensor) -> torch.Tensor:
        x = args[0]
        keep = torch.rand(x.shape, generator=generator).to(x.device) < probability
        return torch.where(keep, x, quantized)
    return forward_hooks(quantizers, drop)
