"""Running a network on whole images: optional window padding and tiling for large inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple:
    """Reflect-pad (N, C, H, W) on the bottom/right to a multiple of ``multiple``; returns (x, pad_h, pad_w)."""
    if multiple <= 1:
        return x, 0, 0
    pad_h = (multiple - x.shape[-2] % multiple) % multiple
    pad_w = (multiple - x.shape[-1] % multiple) % multiple
    if pad_h or pad_w:
        mode = 'reflect' if pad_h < x.shape[-2] and pad_w < x.shape[-1] else 'replicate'
        x = F.pad(x, (0, pad_w, 0, pad_h), mode)
    return x, pad_h, pad_w


def run_padded(net: nn.Module, x: torch.Tensor, scale: int, window: int = 1) -> torch.Tensor:
    """``net(x)`` with ``x`` padded to a multiple of ``window`` and the output cropped back."""
    padded, pad_h, pad_w = pad_to_multiple(x, window)
    out = net(padded)
    return out[..., :x.shape[-2] * scale, :x.shape[-1] * scale]


def run_tiled(net: nn.Module, x: torch.Tensor, scale: int, tile: int, pad: int, window: int = 1) -> torch.Tensor:
    """Run ``net`` on overlapping tiles of ``x`` and stitch the centres; ``tile <= 0`` runs the whole image.

    Each tile is extended by ``pad`` LR pixels of context on every side; only its centre is kept, so
    with enough context the result equals the whole-image output up to the receptive field's edge.
    """
    if tile <= 0 or (x.shape[-2] <= tile and x.shape[-1] <= tile):
        return run_padded(net, x, scale, window)
    n, _, height, width = x.shape
    output = None
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            t0, l0 = max(top - pad, 0), max(left - pad, 0)
            b0, r0 = min(bottom + pad, height), min(right + pad, width)
            piece = run_padded(net, x[..., t0:b0, l0:r0], scale, window)
            if output is None:
                output = x.new_zeros(n, piece.shape[1], height * scale, width * scale)
            output[..., top * scale:bottom * scale, left * scale:right * scale] = piece[
                ..., (top - t0) * scale:(bottom - t0) * scale, (left - l0) * scale:(right - l0) * scale]
    return output


class TiledNetwork(nn.Module):
    """``net`` run through :func:`run_tiled`, as a module: for test loops that call the network themselves
    (an mmengine model's ``generator``). ``tile <= 0`` runs whole images."""

    def __init__(self, net: nn.Module, scale: int, tile: int, pad: int, window: int = 1) -> None:
        super().__init__()
        self.net = net
        self.scale, self.tile, self.pad, self.window = scale, tile, pad, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_tiled(self.net, x, self.scale, self.tile, self.pad, self.window)
