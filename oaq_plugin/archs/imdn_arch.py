"""IMDN, the information multi-distillation network (Hui et al., ACM MM 2019), in torch only."""
from __future__ import annotations

import torch
from torch import nn


def _contrast(x: torch.Tensor) -> torch.Tensor:
    """Per-channel standard deviation plus mean over the spatial positions, shape (N, C, 1, 1)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    # Population variance written out, as the paper's contrast term is defined, not torch.std's unbiased one.
    std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
    return std + mean


class ContrastChannelAttention(nn.Module):
    """Contrast-aware channel attention: gates each channel by a squeeze-excite of its contrast.

    Args:
        num_feat (int): Channel number of the features. Default: 64.
        reduction (int): Channel reduction of the bottleneck. Default: 16.
    """

    def __init__(self, num_feat: int = 64, reduction: int = 16) -> None:
        super().__init__()
        # Index layout (conv, relu, conv, sigmoid) is what the checkpoints' `conv_du.0` / `conv_du.2` keys expect.
        self.conv_du = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // reduction, num_feat, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(_contrast(x))


class IMDB(nn.Module):
    """Information multi-distillation block.

    Each of three 3x3 convs keeps a quarter of its output channels ("distilled") and passes the rest on;
    a fourth conv distils the last remainder, and the four slices are fused by channel attention and a
    1x1 conv, with a block residual.

    Args:
        num_feat (int): Channel number of the block input and output. Default: 64.
        distillation_rate (float): Fraction of channels kept at each step. Default: 0.25.
        negative_slope (float): Slope of the LeakyReLU activations. Default: 0.05.
    """

    def __init__(self, num_feat: int = 64, distillation_rate: float = 0.25, negative_slope: float = 0.05) -> None:
        super().__init__()
        self.distilled = int(num_feat * distillation_rate)
        self.remaining = num_feat - self.distilled
        self.c1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.c2 = nn.Conv2d(self.remaining, num_feat, 3, padding=1)
        self.c3 = nn.Conv2d(self.remaining, num_feat, 3, padding=1)
        self.c4 = nn.Conv2d(self.remaining, self.distilled, 3, padding=1)
        self.act = nn.LeakyReLU(negative_slope)
        self.c5 = nn.Conv2d(self.distilled * 4, num_feat, 1)
        self.cca = ContrastChannelAttention(self.distilled * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = (self.distilled, self.remaining)
        distilled_1, remaining = torch.split(self.act(self.c1(x)), split, dim=1)
        distilled_2, remaining = torch.split(self.act(self.c2(remaining)), split, dim=1)
        distilled_3, remaining = torch.split(self.act(self.c3(remaining)), split, dim=1)
        distilled_4 = self.c4(remaining)
        fused = torch.cat([distilled_1, distilled_2, distilled_3, distilled_4], dim=1)
        return self.c5(self.cca(fused)) + x


class IMDN(nn.Module):
    """IMDN super-resolution network, RGB [0, 1] in and out.

    Paper: Lightweight Image Super-Resolution with Information Multi-distillation Network.
    The attribute names (`fea_conv`, `IMDB1`..`IMDBn`, `c`, `LR_conv`, `upsampler`) follow the released
    checkpoints, so they load strictly once their `module.` prefix is removed.

    Args:
        num_in_ch (int): Channel number of inputs. Default: 3.
        num_out_ch (int): Channel number of outputs. Default: 3.
        num_feat (int): Channel number of intermediate features. Default: 64.
        num_block (int): Number of IMDB blocks. Default: 6.
        upscale (int): Upsampling factor (the PixelShuffle factor). Default: 4.
        negative_slope (float): Slope of every LeakyReLU. Default: 0.05.
    """

    def __init__(self,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 num_feat: int = 64,
                 num_block: int = 6,
                 upscale: int = 4,
                 negative_slope: float = 0.05) -> None:
        super().__init__()
        self.upscale = upscale
        self.num_block = num_block
        self.fea_conv = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        for index in range(1, num_block + 1):
            self.add_module(f'IMDB{index}', IMDB(num_feat, negative_slope=negative_slope))
        self.c = nn.Sequential(nn.Conv2d(num_feat * num_block, num_feat, 1), nn.LeakyReLU(negative_slope))
        self.LR_conv = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.upsampler = nn.Sequential(
            nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, padding=1),
            nn.PixelShuffle(upscale),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.fea_conv(x)
        block_outputs = []
        out = feature
        for index in range(1, self.num_block + 1):
            out = getattr(self, f'IMDB{index}')(out)
            block_outputs.append(out)
        out = self.LR_conv(self.c(torch.cat(block_outputs, dim=1))) + feature
        return self.upsampler(out)
