"""The weight quantizer (docs/METHOD.md, Weight quantizer): symmetric uniform grid with a learnable clip ``u_w``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import OAQConfig, WEIGHT_GRANULARITIES, WEIGHT_GRIDS
from .region_grid import MIN_STEP
from .rounding import round_ste

# alpha in {1.00, 0.99, ..., 0.11}: the shrink search of the paper.
SHRINK_FACTORS = tuple(round(1.0 - 0.01 * i, 2) for i in range(90))


class WeightQuantizer(nn.Module):
    """Uniform symmetric weight quantizer, per tensor or per output channel.

    ``paper`` grid: 2^b levels on ``[-u_w, u_w]`` (zero is not a level for even counts, as in the paper).
    ``zero`` grid: 2^b - 1 levels ``k * u_w / (2^(b-1) - 1)`` that include zero.
    Either way a weight decodes as ``(code - zero_point) * step`` with an unsigned integer ``code``.

    Codes round to nearest, unless a learned rounding is set (:meth:`set_rounding`, the learned-rounding
    stage): then each weight's code is the floor of its grid position plus its own 0/1 flag.

    Args:
        bits: Weight bits b.
        granularity: ``channel`` (one clip per output channel) or ``tensor``.
        channel_axis: Axis of the output channels in the weight (1 for ConvTranspose2d, else 0).
        grid: ``paper`` or ``zero``.
    """

    def __init__(self, bits: int, granularity: str = OAQConfig.weight_granularity, channel_axis: int = 0,
                 grid: str = OAQConfig.weight_grid) -> None:
        super().__init__()
        if granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f'granularity must be one of {WEIGHT_GRANULARITIES}, got {granularity!r}')
        if grid not in WEIGHT_GRIDS:
            raise ValueError(f'grid must be one of {WEIGHT_GRIDS}, got {grid!r}')
        self.bits = int(bits)
        self.granularity = granularity
        self.channel_axis = channel_axis
        self.grid_kind = grid
        self.clip = nn.Parameter(torch.tensor(1.0))
        # Learned rounding: per weight, 1 rounds the grid position up, 0 down; ``None``: round to nearest.
        self.register_buffer('rounding', None)

    @property
    def num_levels(self) -> int:
        return 2 ** self.bits if self.grid_kind == 'paper' else 2 ** self.bits - 1

    @property
    def zero_point(self) -> float:
        return (self.num_levels - 1) / 2.0

    def _reduce_shape(self, weight: torch.Tensor) -> list:
        shape = [1] * weight.dim()
        if self.granularity == 'channel':
            shape[self.channel_axis] = weight.shape[self.channel_axis]
        return shape

    def _abs_max(self, weight: torch.Tensor) -> torch.Tensor:
        if self.granularity == 'tensor':
            return weight.abs().max().reshape([1] * weight.dim())
        dims = [d for d in range(weight.dim()) if d != self.channel_axis]
        return weight.abs().amax(dim=dims, keepdim=True)

    @staticmethod
    def effective_clip(clip: torch.Tensor) -> torch.Tensor:
        """``clip`` floored at ``MIN_STEP``: the clip an all-zero or vanishing channel is quantized with."""
        return torch.clamp(clip, min=MIN_STEP)

    def step(self, clip: torch.Tensor) -> torch.Tensor:
        """``2 * clip / (num_levels - 1)`` of the effective clip.

        The floor is on the clip, never on the step alone: the grid then always spans exactly
        ``[-clip, clip]``, so ``(code - zero_point) * step`` decodes the codes of :meth:`grid_position`.
        (A step floored by itself made channels with clips below ``MIN_STEP * (num_levels - 1) / 2``,
        about 1.3e-6 at 8 bits, decode shifted by ``zero_point * step - clip``.)
        """
        return 2 * self.effective_clip(clip) / (self.num_levels - 1)

    def grid_position(self, weight: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """The unrounded code of each weight under ``clip`` (in ``[0, num_levels - 1]``)."""
        clip = self.effective_clip(clip)
        return (torch.clamp(weight, -clip, clip) + clip) / self.step(clip)

    def _round(self, position: torch.Tensor) -> torch.Tensor:
        if self.rounding is None:
            return round_ste(position)
        code = torch.clamp(torch.floor(position) + self.rounding, 0, self.num_levels - 1)
        return position + (code - position).detach()

    def quantize_with(self, weight: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """Fake-quantize with a given clip (straight-through rounding; gradients reach ``clip``)."""
        clip = self.effective_clip(clip)
        code = self._round(self.grid_position(weight, clip))
        return (code - self.zero_point) * self.step(clip)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantize_with(weight, self.clip)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """Shrink search: the clip ``alpha * max|W|`` with the least squared error, per clip group."""
        weight = weight.detach().float()
        abs_max = torch.clamp(self._abs_max(weight), min=MIN_STEP)
        dims = list(range(weight.dim())) if self.granularity == 'tensor' else \
            [d for d in range(weight.dim()) if d != self.channel_axis]
        best_error = torch.full_like(abs_max, float('inf'))
        best_clip = abs_max.clone()
        for alpha in SHRINK_FACTORS:
            clip = abs_max * alpha
            error = ((self.quantize_with(weight, clip) - weight) ** 2).sum(dim=dims, keepdim=True)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_clip = torch.where(better, clip, best_clip)
        self.clip = nn.Parameter(best_clip)

    @torch.no_grad()
    def set_clip(self, clip: torch.Tensor) -> None:
        self.clip.copy_(clip.reshape(self.clip.shape))

    @torch.no_grad()
    def integer_codes(self, weight: torch.Tensor) -> tuple:
        """``(codes uint8, step, zero_point)`` with ``weight_q = (codes - zero_point) * step``."""
        clip = self.effective_clip(self.clip)
        codes = self._round(self.grid_position(weight, clip))
        return codes.to(torch.uint8), self.step(clip).detach().clone(), self.zero_point

    @torch.no_grad()
    def set_rounding(self, rounding: Optional[torch.Tensor]) -> None:
        """Fix each weight's rounding direction (0/1 tensor of the weight's shape), or ``None`` for nearest."""
        self.rounding = None if rounding is None else rounding.detach().to(torch.uint8).clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A learned rounding in the state (a resume state, a saved model) is taken even by a quantizer
        # built without one; a state without it leaves rounding to nearest.
        key = prefix + 'rounding'
        self.rounding = state_dict[key].detach().clone() if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def describe(self) -> dict:
        clip = self.clip.detach().reshape(-1)
        return {'bits': self.bits, 'granularity': self.granularity, 'grid': self.grid_kind,
                'clip_mean': float(clip.mean()), 'clip_max': float(clip.max())}

    def extra_repr(self) -> str:
        return f'bits={self.bits}, granularity={self.granularity}, grid={self.grid_kind}'
