"""Calibration statistics of one layer input, in bounded memory and mergeable across processes.

Each calibration batch leaves a small record (min, max, percentiles from a histogram, the sum of
per-sample standard deviations) and a fixed-size random sample of its values. Min and max are exact; on a
batch of more than :data:`STATISTICS_VALUES` values the percentiles and standard deviations are read from an
evenly strided subset of about that many values (a prime stride, so it does not follow the rows or the
channels), which keeps calibration near the cost of a float forward pass. The EMA across batches
(docs/METHOD.md, Calibration statistics) is applied only when the statistics are read, in global batch
order, so records gathered from several processes give exactly what one process would have computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ..config import CalibConfig
from .seeding import seeded_generator

HISTOGRAM_BINS = 4096
KEPT_SAMPLE_BATCHES = 8
# Above this many values per batch the quantiles and standard deviations come from a strided subset.
STATISTICS_VALUES = 1 << 20


@dataclass
class BatchStats:
    """The statistics one batch contributes."""

    index: int
    minimum: float
    maximum: float
    quantile_low: float
    quantile_high: float
    quantile_abs: float
    std_sum: float
    num_samples: int


@dataclass
class ObservedStats:
    """EMA-smoothed statistics of a layer input."""

    minimum: float
    maximum: float
    quantile_low: float
    quantile_high: float
    quantile_abs: float
    mean_std: float
    num_batches: int


def all_finite(values: torch.Tensor) -> bool:
    """Whether ``values`` holds no NaN or infinity (one min/max pass: both propagate a NaN)."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _prime_at_least(n: int) -> int:
    candidate = max(2, n)
    while any(candidate % d == 0 for d in range(2, int(candidate ** 0.5) + 1)):
        candidate += 1
    return candidate


def statistics_stride(count: int, budget: int = STATISTICS_VALUES) -> int:
    """The stride of the subset statistics are read from: 1 up to ``budget`` values, else a prime near
    ``count / budget``."""
    return 1 if count <= budget else _prime_at_least(-(-count // budget))


class _Histogram:
    """A histogram of ``values`` on ``[low, high]``, with its CDF interpolated linearly inside each bin."""

    def __init__(self, values: torch.Tensor, low: float, high: float, bins: int) -> None:
        self.low, self.high, self.bins = low, high, bins
        counts = torch.histc(values, bins=bins, min=low, max=high).double().cpu()
        self.total = float(counts.sum())
        self.counts = counts
        self.cdf = torch.cumsum(counts, 0)
        self.width = (high - low) / bins

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the values lie."""
        target = q * self.total
        position = int(torch.searchsorted(self.cdf, torch.tensor([target], dtype=self.cdf.dtype))
                       .clamp(max=self.bins - 1))
        before = float(self.cdf[position - 1]) if position > 0 else 0.0
        inside = float(self.counts[position])
        fraction = 0.0 if inside <= 0 else min(max((target - before) / inside, 0.0), 1.0)
        return self.low + (position + fraction) * self.width

    def below(self, value: float) -> float:
        """How many values lie below ``value`` (the interpolated CDF)."""
        if value <= self.low:
            return 0.0
        if value >= self.high:
            return self.total
        offset = (value - self.low) / self.width
        position = min(int(offset), self.bins - 1)
        before = float(self.cdf[position - 1]) if position > 0 else 0.0
        return before + (offset - position) * float(self.counts[position])

    def abs_quantile(self, q: float, steps: int = 60) -> float:
        """The ``q``-quantile of the magnitudes, from the same histogram: the ``t >= 0`` at which the
        interpolated ``CDF(t) - CDF(-t)`` reaches ``q`` of the values (bisection; exact to a bin width)."""
        target = q * self.total
        lo, hi = 0.0, max(abs(self.low), abs(self.high))
        for _ in range(steps):
            middle = 0.5 * (lo + hi)
            if self.below(middle) - self.below(-middle) < target:
                lo = middle
            else:
                hi = middle
        return hi


def histogram_quantiles(values: torch.Tensor, qs: Sequence[float], bins: int = HISTOGRAM_BINS) -> List[float]:
    """The ``q``-quantiles (0..1) of ``values`` for each ``q`` of ``qs``, from one histogram, each
    interpolated inside its bin.

    Memory is O(bins) beyond the input; exact up to a fraction of one bin width.
    """
    flat = values.detach().reshape(-1).float()
    low, high = (float(v) for v in torch.aminmax(flat))
    if high <= low:
        return [low for _ in qs]
    histogram = _Histogram(flat, low, high, bins)
    return [histogram.quantile(q) for q in qs]


def histogram_quantile(values: torch.Tensor, q: float, bins: int = HISTOGRAM_BINS) -> float:
    """The ``q``-quantile (0..1) of ``values`` from a histogram (see :func:`histogram_quantiles`)."""
    return histogram_quantiles(values, [q], bins)[0]


class ActivationObserver:
    """Collects per-batch statistics of a tensor stream.

    Args:
        percentile: Percentile (0-100) for the upper quantile; the lower quantile is ``100 - percentile``.
        sample_size: Values kept in all (a sample of each of the last few batches).
        seed: Seed of the per-batch sampler.
    """

    def __init__(self, percentile: float = CalibConfig.percentile, sample_size: int = CalibConfig.sample_size,
                 seed: int = CalibConfig.seed) -> None:
        self.percentile = percentile
        self.sample_size = sample_size
        self.seed = seed
        self.records: List[BatchStats] = []
        self.samples: Dict[int, torch.Tensor] = {}
        self._next_index = 0

    def observe(self, x: torch.Tensor, index: Optional[int] = None) -> None:
        """Record one batch. ``index`` is its global position (defaults to arrival order)."""
        if index is None:
            index = self._next_index
        self._next_index = max(self._next_index, index + 1)
        x = x.detach().float()
        q = self.percentile / 100.0
        per_sample = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
        low, high = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
        subset = per_sample[:, ::statistics_stride(per_sample.numel())]
        if subset.shape[1] > 1:
            std = subset.std(dim=1, unbiased=False)
        else:
            std = torch.zeros(per_sample.shape[0], device=x.device)
        if high > low:
            # The signed quantiles and the magnitude quantile all come from one histogram of the subset
            # (which the exact min and max bound).
            histogram = _Histogram(subset.reshape(-1), low, high, HISTOGRAM_BINS)
            quantile_low, quantile_high = histogram.quantile(1.0 - q), histogram.quantile(q)
            quantile_abs = histogram.abs_quantile(q)
        else:
            quantile_low = quantile_high = low
            quantile_abs = abs(low)
        self.records.append(BatchStats(
            index=index,
            minimum=low,
            maximum=high,
            quantile_low=quantile_low,
            quantile_high=quantile_high,
            quantile_abs=quantile_abs,
            std_sum=float(std.sum()),
            num_samples=int(per_sample.shape[0]),
        ))
        per_batch = max(1, self.sample_size // KEPT_SAMPLE_BATCHES)
        flat = x.reshape(-1)
        if flat.numel() > per_batch:
            generator = seeded_generator(self.seed, index)
            flat = flat[torch.randint(0, flat.numel(), (per_batch,), generator=generator)]
        self.samples[index] = flat.cpu().clone()
        self._trim_samples()

    def _trim_samples(self) -> None:
        for index in sorted(self.samples)[:-KEPT_SAMPLE_BATCHES]:
            del self.samples[index]

    @property
    def num_batches(self) -> int:
        return len(self.records)

    def sample(self) -> torch.Tensor:
        """The kept values, in batch order (empty before any batch)."""
        if not self.samples:
            return torch.empty(0)
        return torch.cat([self.samples[i] for i in sorted(self.samples)])

    def state_dict(self) -> dict:
        """Picklable state for gathering across processes."""
        return {'records': list(self.records), 'samples': dict(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        """Replace the records and kept samples by those of a :meth:`state_dict` (to resume a calibration)."""
        self.records = list(state['records'])
        self.samples = dict(state['samples'])
        self._next_index = max((record.index + 1 for record in self.records), default=0)
        self._trim_samples()

    def merge(self, states: Iterable[dict]) -> None:
        """Add the records of other observers (e.g. other ranks); duplicates by index are ignored."""
        known = {r.index for r in self.records}
        for state in states:
            for record in state['records']:
                if record.index not in known:
                    self.records.append(record)
                    known.add(record.index)
            for index, values in state['samples'].items():
                self.samples.setdefault(index, values)
        self._trim_samples()

    def stats(self, beta: float = CalibConfig.ema_beta) -> ObservedStats:
        """EMA over batches in index order; the first batch sets each statistic directly."""
        if not self.records:
            raise RuntimeError('no calibration batch was observed')
        ordered = sorted(self.records, key=lambda r: r.index)
        names = ('minimum', 'maximum', 'quantile_low', 'quantile_high', 'quantile_abs')
        smoothed = {name: getattr(ordered[0], name) for name in names}
        for record in ordered[1:]:
            for name in names:
                smoothed[name] = beta * smoothed[name] + (1.0 - beta) * getattr(record, name)
        total_std = sum(r.std_sum for r in ordered)
        total = sum(r.num_samples for r in ordered)
        return ObservedStats(mean_std=total_std / max(total, 1), num_batches=len(ordered), **smoothed)
