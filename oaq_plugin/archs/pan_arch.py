"""PAN, the pixel attention network (Zhao et al., ECCV workshops 2020), in torch only."""
from __future__ import annotations

import torch
from torch import nn


class PixelAttention(nn.Module):
    """Gates every feature value by a sigmoid of a 1x1 conv of the same features.

    Args:
        num_feat (int): Channel number of the features.
    """

    def __init__(self, num_feat: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(num_feat, num_feat, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.conv(x))


class PixelAttentionConv(nn.Module):
    """A 3x3 conv whose output is gated by pixel attention computed from its input, then another 3x3 conv.

    Args:
        num_feat (int): Channel number of the features.
        kernel_size (int): Kernel size of the two main convs. Default: 3.
    """

    def __init__(self, num_feat: int, kernel_size: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.k2 = nn.Conv2d(num_feat, num_feat, 1)
        self.sigmoid = nn.Sigmoid()
        self.k3 = nn.Conv2d(num_feat, num_feat, kernel_size, padding=padding, bias=False)
        self.k4 = nn.Conv2d(num_feat, num_feat, kernel_size, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k4(self.k3(x) * self.sigmoid(self.k2(x)))


class SCPA(nn.Module):
    """Self-calibrated block with pixel attention.

    The input is split by two 1x1 convs into a plain 3x3 branch and a pixel-attention branch, which are
    concatenated, fused by a 1x1 conv and added to the input. The convs of this block carry no bias.

    Args:
        num_feat (int): Channel number of the block input and output. Default: 40.
        reduction (int): Each branch works on ``num_feat // reduction`` channels. Default: 2.
        negative_slope (float): Slope of the LeakyReLU activations. Default: 0.2.
    """

    def __init__(self, num_feat: int = 40, reduction: int = 2, negative_slope: float = 0.2) -> None:
        super().__init__()
        branch_feat = num_feat // reduction
        self.conv1_a = nn.Conv2d(num_feat, branch_feat, 1, bias=False)
        self.conv1_b = nn.Conv2d(num_feat, branch_feat, 1, bias=False)
        # A one-element Sequential because the checkpoints name this conv `k1.0`.
        self.k1 = nn.Sequential(nn.Conv2d(branch_feat, branch_feat, 3, padding=1, bias=False))
        self.PAConv = PixelAttentionConv(branch_feat)
        self.conv3 = nn.Conv2d(branch_feat * reduction, num_feat, 1, bias=False)
        self.lrelu = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.lrelu(self.k1(self.lrelu(self.conv1_a(x))))
        attended = self.lrelu(self.PAConv(self.lrelu(self.conv1_b(x))))
        return self.conv3(torch.cat([plain, attended], dim=1)) + x


class PAN(nn.Module):
    """PAN super-resolution network, RGB [0, 1] in and out.

    Paper: Efficient Image Super-Resolution Using Pixel Attention. Upsampling is nearest-neighbour
    interpolation followed by convs (one x2/x3 stage, or two x2 stages for x4), and the network predicts a
    residual over the bilinearly upsampled input. The interpolations are ``nn.Upsample`` modules so that
    graph passes can see where the resolution changes.

    Args:
        num_in_ch (int): Channel number of inputs. Default: 3.
        num_out_ch (int): Channel number of outputs. Default: 3.
        num_feat (int): Channel number of the low-resolution trunk (``nf``). Default: 40.
        num_up_feat (int): Channel number of the upsampling stages (``unf``). Default: 24.
        num_block (int): Number of SCPA blocks. Default: 16.
        upscale (int): Upsampling factor, 2, 3 or 4. Default: 4.
        negative_slope (float): Slope of every LeakyReLU. Default: 0.2.
    """

    def __init__(self,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 num_feat: int = 40,
                 num_up_feat: int = 24,
                 num_block: int = 16,
                 upscale: int = 4,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        if upscale not in (2, 3, 4):
            raise ValueError(f'PAN supports upscale 2, 3 or 4, got {upscale}')
        self.upscale = upscale
        stage_factors = (2, 2) if upscale == 4 else (upscale,)

        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        self.SCPA_trunk = nn.Sequential(*[SCPA(num_feat, negative_slope=negative_slope) for _ in range(num_block)])
        self.trunk_conv = nn.Conv2d(num_feat, num_feat, 3, padding=1)

        in_feat = num_feat
        self.num_stages = len(stage_factors)
        for stage, factor in enumerate(stage_factors, start=1):
            self.add_module(f'upsample{stage}', nn.Upsample(scale_factor=factor, mode='nearest'))
            self.add_module(f'upconv{stage}', nn.Conv2d(in_feat, num_up_feat, 3, padding=1))
            self.add_module(f'att{stage}', PixelAttention(num_up_feat))
            self.add_module(f'HRconv{stage}', nn.Conv2d(num_up_feat, num_up_feat, 3, padding=1))
            in_feat = num_up_feat
        self.conv_last = nn.Conv2d(num_up_feat, num_out_ch, 3, padding=1)
        self.lrelu = nn.LeakyReLU(negative_slope)
        self.input_upsample = nn.Upsample(scale_factor=upscale, mode='bilinear', align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.conv_first(x)
        feature = feature + self.trunk_conv(self.SCPA_trunk(feature))
        for stage in range(1, self.num_stages + 1):
            feature = getattr(self, f'upconv{stage}')(getattr(self, f'upsample{stage}')(feature))
            feature = self.lrelu(getattr(self, f'att{stage}')(feature))
            feature = self.lrelu(getattr(self, f'HRconv{stage}')(feature))
        return self.conv_last(feature) + self.input_upsample(x)
