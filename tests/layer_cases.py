"""Quantized layers with random weights and random quantizer parameters, shared by the backend tests."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import nn

from oaq_plugin import OAQConfig, quantize
from oaq_plugin.backends.select import to_backend
from oaq_plugin.quant import DualRegionQuantizer, QuantConv2d, QuantConvTranspose2d, QuantLinear, UniformQuantizer
from oaq_plugin.quant import WeightQuantizer

# Activation grids every quantizer of the project produces.
GRIDS = ('paper', 'pwlq', 'uniform', 'one_sided_high', 'one_sided_low', 'degenerate')


def act_quantizer(kind: str, bits: int, generator: torch.Generator, scale: float = 4.0):
    """An activation quantizer of ``kind`` with random bounds and breakpoint around ``[-scale, scale]``."""
    r = torch.rand(3, generator=generator)
    lower, upper = -scale * (0.5 + float(r[0])), scale * (0.5 + float(r[1]))
    bp = (0.15 + 0.5 * float(r[2])) * min(-lower, upper)
    if kind == 'uniform':
        q = UniformQuantizer(bits)
        q.set_bounds(lower, upper)
        return q
    levels = 'pwlq' if kind == 'pwlq' else 'paper'
    q = DualRegionQuantizer(bits, levels=levels)
    if kind == 'one_sided_high':
        lower = -0.5 * bp
    elif kind == 'one_sided_low':
        upper = 0.5 * bp
    elif kind == 'degenerate':
        bp = -1.0
    q.set_bounds(lower, upper)
    q.set_breakpoint(bp)
    return q


def make_layer(module: nn.Module, w_bits: int = 4, a_bits: int = 4, grid: str = 'paper', seed: int = 0,
               granularity: str = 'channel', weight_grid: str = 'paper', name: str = 'layer',
               scale: Optional[float] = None):
    """Wrap ``module`` (its weights randomized) in its quantized layer with random quantizer parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    if isinstance(module, nn.ConvTranspose2d):
        wrapper, axis = QuantConvTranspose2d, 1
    elif isinstance(module, nn.Conv2d):
        wrapper, axis = QuantConv2d, 0
    else:
        wrapper, axis = QuantLinear, 0
    weights = WeightQuantizer(w_bits, granularity=granularity, channel_axis=axis, grid=weight_grid)
    layer = wrapper(module, act_quantizer(grid, a_bits, generator, scale or 4.0), weights, name=name)
    return layer.eval()


def random_input(shape, seed: int = 1, scale: float = 3.0) -> torch.Tensor:
    """Gaussian values with a few outliers, so every region of a grid is hit."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scale
    outliers = torch.rand(shape, generator=generator) < 0.05
    return torch.where(outliers, x * 4, x)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# Calibration alone: the search and block reconstruction (on by default) are not what these tests are about.
CALIBRATION_ONLY = {'search': {'enabled': False}, 'reconstruction': {'enabled': False},
                    'distillation': {'enabled': False}}


class TinySR(nn.Module):
    """A few convs (one grouped), a squeeze-excitation with Linear layers, and a x2 pixel-shuffle tail."""

    def __init__(self, feat: int = 16, transposed_tail: bool = False) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, feat, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(feat, feat, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(feat, feat, 3, padding=1, groups=4))
        self.squeeze = nn.Linear(feat, 4)
        self.excite = nn.Linear(4, feat)
        self.upsample = nn.Conv2d(feat, 3 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.tail = nn.ConvTranspose2d(3, 3, 3, padding=1) if transposed_tail else nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        f = self.head(x)
        r = self.body(f)
        weights = torch.sigmoid(self.excite(torch.relu(self.squeeze(r.mean(dim=(2, 3))))))
        f = f + r * weights[:, :, None, None]
        return self.tail(self.shuffle(self.upsample(f)))


_QUANTIZED = {}


def tiny_sr_config(w_bits=4, a_bits=4, levels='paper') -> OAQConfig:
    return OAQConfig.from_dict({**CALIBRATION_ONLY, 'w_bits': w_bits, 'a_bits': a_bits, 'levels': levels})


def quantized_tiny_sr(w_bits=4, a_bits=4, levels='paper', transposed_tail=False):
    """A quantized :class:`TinySR` on the fake backend (quantized once per setting: calibration is slow)."""
    key = (w_bits, a_bits, levels, transposed_tail)
    if key not in _QUANTIZED:
        torch.manual_seed(0)
        model = TinySR(transposed_tail=transposed_tail).eval()
        calib = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        _QUANTIZED[key] = quantize(model, calib, tiny_sr_config(w_bits, a_bits, levels))
    return to_backend(_QUANTIZED[key], 'fake')


@pytest.fixture(autouse=True, scope='module')
def single_thread():
    """One intra-op thread: the quantizers' many small ops slow down badly when threads contend for cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
