"""CARN-M, the mobile cascading residual network (Ahn et al., ECCV 2018), in torch only."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

SUPPORTED_SCALES = (2, 3, 4)


class _FixedPointwise(nn.Module):
    """A 1x1 channel mixing ``y = W x + b`` whose weight and bias are buffers (loaded, never trained)."""

    def __init__(self, matrix: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer('weight', matrix.reshape(*matrix.shape, 1, 1).clone())
        self.register_buffer('bias', offset.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


class ColorShift(nn.Module):
    """A fixed per-pixel 3x3 colour transform plus offset (CARN's mean shift), held as buffers.

    Deliberately not an ``nn.Conv2d``: it is data normalisation, not a learned layer, so layer-wise passes
    (quantizers, "first conv" detection) should not see it. The buffers keep the checkpoint names
    ``shifter.weight`` / ``shifter.bias`` through the ``shifter`` child.

    Args:
        rgb_mean (Sequence[float]): Mean of each RGB channel on the [0, 1] scale.
        sign (int): -1 to subtract the mean, +1 to add it back.
    """

    def __init__(self, rgb_mean: Sequence[float], sign: int) -> None:
        super().__init__()
        self.shifter = _FixedPointwise(torch.eye(3), sign * torch.tensor(rgb_mean, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shifter(x)


class EfficientResidualBlock(nn.Module):
    """Two grouped 3x3 convs and a 1x1 conv, with a residual and a ReLU after the sum.

    Args:
        num_feat (int): Channel number of the block input and output. Default: 64.
        group (int): Groups of the two 3x3 convs. Default: 4.
    """

    def __init__(self, num_feat: int = 64, group: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(num_feat, num_feat, 3, padding=1, groups=group),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat, num_feat, 3, padding=1, groups=group),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat, num_feat, 1),
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + x)


class PointwiseReLU(nn.Module):
    """A 1x1 conv followed by ReLU: CARN's cascading fusion of concatenated features.

    Args:
        in_feat (int): Channel number of the concatenated input.
        out_feat (int): Channel number of the output.
    """

    def __init__(self, in_feat: int, out_feat: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_feat, out_feat, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CascadingBlock(nn.Module):
    """CARN-M's local cascading block.

    CARN-M shares one residual block across the cascade: the same ``b1`` runs ``num_step`` times, each
    time on the previous fusion output, which is why the checkpoints hold one residual block per cascading
    block. Code that calibrates per layer should expect ``b1``'s convs to be called several times a forward.

    Args:
        num_feat (int): Channel number of the features. Default: 64.
        group (int): Groups of the residual block's 3x3 convs. Default: 4.
        num_step (int): Length of the cascade. Default: 3.
    """

    def __init__(self, num_feat: int = 64, group: int = 4, num_step: int = 3) -> None:
        super().__init__()
        self.num_step = num_step
        self.b1 = EfficientResidualBlock(num_feat, group)
        for step in range(1, num_step + 1):
            self.add_module(f'c{step}', PointwiseReLU(num_feat * (step + 1), num_feat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _cascade(x, [self.b1] * self.num_step, [getattr(self, f'c{s}') for s in range(1, self.num_step + 1)])


def _cascade(x: torch.Tensor, blocks: Sequence[nn.Module], fusions: Sequence[nn.Module]) -> torch.Tensor:
    """CARN's cascading connection: every fusion sees the input and all block outputs so far, concatenated."""
    concatenated = out = x
    for block, fusion in zip(blocks, fusions):
        concatenated = torch.cat([concatenated, block(out)], dim=1)
        out = fusion(concatenated)
    return out


class ShuffleUpsampler(nn.Module):
    """Grouped conv + ReLU + PixelShuffle stages: one x3 stage, or log2(scale) x2 stages.

    Args:
        num_feat (int): Channel number of the features.
        scale (int): 2, 3 or 4.
        group (int): Groups of the convs. Default: 4.
    """

    def __init__(self, num_feat: int, scale: int, group: int = 4) -> None:
        super().__init__()
        factors = (3,) if scale == 3 else (2,) * {2: 1, 4: 2}[scale]
        layers: list[nn.Module] = []
        for factor in factors:
            layers += [
                nn.Conv2d(num_feat, num_feat * factor * factor, 3, padding=1, groups=group),
                nn.ReLU(inplace=True),
                nn.PixelShuffle(factor),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MultiScaleUpsampler(nn.Module):
    """The x2, x3 and x4 upsamplers of a multi-scale CARN checkpoint; ``forward`` runs the one asked for.

    Args:
        num_feat (int): Channel number of the features. Default: 64.
        group (int): Groups of the convs. Default: 4.
    """

    def __init__(self, num_feat: int = 64, group: int = 4) -> None:
        super().__init__()
        for scale in SUPPORTED_SCALES:
            self.add_module(f'up{scale}', ShuffleUpsampler(num_feat, scale, group))

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        return getattr(self, f'up{scale}')(x)


class CARNM(nn.Module):
    """CARN-M super-resolution network, RGB [0, 1] in and out.

    Paper: Fast, Accurate, and Lightweight Super-Resolution with Cascading Residual Network (the mobile
    variant). One set of weights serves x2, x3 and x4: the body is shared and only the upsampler differs.
    All three upsamplers are always built so the released checkpoint loads strictly; ``upscale`` (settable
    after construction) picks the one ``forward`` uses. The two unused upsamplers are never called, so
    layer-wise passes that rely on forward hooks see no activations for them.

    Args:
        num_feat (int): Channel number of intermediate features. Default: 64.
        num_block (int): Number of cascading blocks. Default: 3.
        group (int): Groups of the grouped convs. Default: 4.
        upscale (int): Upsampling factor used by ``forward``, 2, 3 or 4. Default: 4.
        rgb_mean (Sequence[float]): Initial mean of the colour shifts (the checkpoint overrides it).
            Default: (0.4488, 0.4371, 0.4040), the DIV2K mean.
    """

    def __init__(self,
                 num_feat: int = 64,
                 num_block: int = 3,
                 group: int = 4,
                 upscale: int = 4,
                 rgb_mean: Sequence[float] = (0.4488, 0.4371, 0.4040)) -> None:
        super().__init__()
        self.upscale = upscale
        self.num_block = num_block
        self.sub_mean = ColorShift(rgb_mean, sign=-1)
        self.add_mean = ColorShift(rgb_mean, sign=1)
        self.entry = nn.Conv2d(3, num_feat, 3, padding=1)
        for index in range(1, num_block + 1):
            self.add_module(f'b{index}', CascadingBlock(num_feat, group))
        for index in range(1, num_block + 1):
            self.add_module(f'c{index}', PointwiseReLU(num_feat * (index + 1), num_feat))
        self.upsample = MultiScaleUpsampler(num_feat, group)
        self.exit = nn.Conv2d(num_feat, 3, 3, padding=1)

    @property
    def upscale(self) -> int:
        return self._upscale

    @upscale.setter
    def upscale(self, value: int) -> None:
        if value not in SUPPORTED_SCALES:
            raise ValueError(f'CARNM supports upscale {SUPPORTED_SCALES}, got {value}')
        self._upscale = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = range(1, self.num_block + 1)
        out = self.entry(self.sub_mean(x))
        out = _cascade(out, [getattr(self, f'b{i}') for i in indices], [getattr(self, f'c{i}') for i in indices])
        return self.add_mean(self.exit(self.upsample(out, self.upscale)))
