"""Calibration statistics of one layer input, in bounded memory and mergeable across processes.

Each calibration batch leaves a small record (min, max, percentiles from a histogram, the sum of
per-sample standard deviations) and a fixed-size random sample of its values. The EMA across batches
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


def histogram_quantiles(values: torch.Tensor, qs: Sequence[float], bins: int = HISTOGRAM_BINS) -> List[float]:
    """The ``q``-quantiles (0..1) of ``values`` for each ``q`` of ``qs``, from one histogram, each
    interpolated inside its bin.

    Memory is O(bins) beyond the input; exact up to a fraction of one bin width.
    """
    flat = values.detach().reshape(-1).float()
    low, high = float(flat.min()), float(flat.max())
    if high <= low:
        return [low for _ in qs]
    hist = torch.histc(flat, bins=bins, min=low, max=high).double()
    cdf = torch.cumsum(hist, 0)
    width = (high - low) / bins
    results = []
    for q in qs:
        target = q * float(cdf[-1])
        target_tensor = torch.tensor([target], dtype=cdf.dtype, device=cdf.device)
        position = int(torch.searchsorted(cdf, target_tensor).clamp(max=bins - 1))
        before = float(cdf[position - 1]) if position > 0 else 0.0
        inside = float(hist[position])
        fraction = 0.0 if inside <= 0 else min(max((target - before) / inside, 0.0), 1.0)
        results.append(low + (position + fraction) * width)
    return results


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
        if per_sample.shape[1] > 1:
            std = per_sample.std(dim=1, unbiased=False)
        else:
            std = torch.zeros(per_sample.shape[0], device=x.device)
        # Both signed quantiles come from one histogram.
        quantile_low, quantile_high = histogram_quantiles(x, [1.0 - q, q])
        self.records.append(BatchStats(
            index=index,
            minimum=float(x.min()),
            maximum=float(x.max()),
            quantile_low=quantile_low,
            quantile_high=quantile_high,
            quantile_abs=histogram_quantile(x.abs(), q),
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
