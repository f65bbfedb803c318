"""RFDN, the residual feature distillation network (Liu et al., ECCV workshops 2020), in torch only."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ESA(nn.Module):
    """Enhanced spatial attention: a strided, max-pooled branch with a large receptive field gates the features.

    The branch shrinks the map by a stride-2 conv and a 7x7/stride-3 max pool, so the input must be at least
    15x15 pixels.

    Args:
        num_feat (int): Channel number of the features. Default: 50.
        reduction (int): The attention branch works on ``num_feat // reduction`` channels. Default: 4.
    """

    def __init__(self, num_feat: int = 50, reduction: int = 4) -> None:
        super().__init__()
        branch_feat = num_feat // reduction
        self.conv1 = nn.Conv2d(num_feat, branch_feat, 1)
        self.conv_f = nn.Conv2d(branch_feat, branch_feat, 1)
        self.conv_max = nn.Conv2d(branch_feat, branch_feat, 3, padding=1)
        self.conv2 = nn.Conv2d(branch_feat, branch_feat, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(branch_feat, branch_feat, 3, padding=1)
        self.conv3_ = nn.Conv2d(branch_feat, branch_feat, 3, padding=1)
        self.conv4 = nn.Conv2d(branch_feat, num_feat, 1)
        self.pool = nn.MaxPool2d(kernel_size=7, stride=3)
        self.relu = nn.ReLU(inplace=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(x)
        pooled = self.pool(self.conv2(reduced))
        branch = self.relu(self.conv3(self.relu(self.conv_max(pooled))))
        branch = self.conv3_(branch)
        branch = F.interpolate(branch, size=x.shape[-2:], mode='bilinear', align_corners=False)
        return x * self.sigmoid(self.conv4(branch + self.conv_f(reduced)))


class RFDB(nn.Module):
    """Residual feature distillation block.

    Three steps each split the features into a 1x1 "distilled" slice and a 3x3 shallow-residual path that
    continues; a fourth 3x3 conv distils the last path; the four slices are fused by a 1x1 conv and ESA.

    Args:
        num_feat (int): Channel number of the block input and output. Default: 50.
        negative_slope (float): Slope of the LeakyReLU activations. Default: 0.05.
    """

    def __init__(self, num_feat: int = 50, negative_slope: float = 0.05) -> None:
        super().__init__()
        distilled = num_feat // 2
        self.c1_d = nn.Conv2d(num_feat, distilled, 1)
        self.c1_r = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.c2_d = nn.Conv2d(num_feat, distilled, 1)
        self.c2_r = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.c3_d = nn.Conv2d(num_feat, distilled, 1)
        self.c3_r = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.c4 = nn.Conv2d(num_feat, distilled, 3, padding=1)
        self.act = nn.LeakyReLU(negative_slope)
        self.c5 = nn.Conv2d(distilled * 4, num_feat, 1)
        self.esa = ESA(num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distilled_1 = self.act(self.c1_d(x))
        residual_1 = self.act(self.c1_r(x) + x)
        distilled_2 = self.act(self.c2_d(residual_1))
        residual_2 = self.act(self.c2_r(residual_1) + residual_1)
        distilled_3 = self.act(self.c3_d(residual_2))
        residual_3 = self.act(self.c3_r(residual_2) + residual_2)
        distilled_4 = self.act(self.c4(residual_3))
        fused = torch.cat([distilled_1, distilled_2, distilled_3, distilled_4], dim=1)
        return self.esa(self.c5(fused))


class RFDN(nn.Module):
    """RFDN super-resolution network, RGB [0, 1] in and out.

    Paper: Residual Feature Distillation Network for Lightweight Image Super-Resolution. The released
    AIM 2020 weights were trained on RGB [0, 255]; ``img_range`` rescales the input and output so that the
    class follows BasicSR's [0, 1] convention (with raw [0, 1] input those weights score about 26 dB).

    Args:
        num_in_ch (int): Channel number of inputs. Default: 3.
        num_out_ch (int): Channel number of outputs. Default: 3.
        num_feat (int): Channel number of intermediate features. Default: 50.
        num_block (int): Number of RFDB blocks. Default: 4.
        upscale (int): Upsampling factor (the PixelShuffle factor). Default: 4.
        img_range (float): Pixel range the weights expect; input is multiplied by it and output divided.
            Default: 255.
        negative_slope (float): Slope of every LeakyReLU. Default: 0.05.
    """

    def __init__(self,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 num_feat: int = 50,
                 num_block: int = 4,
                 upscale: int = 4,
                 img_range: float = 255.,
                 negative_slope: float = 0.05) -> None:
        super().__init__()
        self.upscale = upscale
        self.img_range = img_range
        self.num_block = num_block
        self.fea_conv = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        for index in range(1, num_block + 1):
            self.add_module(f'B{index}', RFDB(num_feat, negative_slope=negative_slope))
        self.c = nn.Sequential(nn.Conv2d(num_feat * num_block, num_feat, 1), nn.LeakyReLU(negative_slope))
        self.LR_conv = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.upsampler = nn.Sequential(
            nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, padding=1),
            nn.PixelShuffle(upscale),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.fea_conv(x * self.img_range)
        block_outputs = []
        out = feature
        for index in range(1, self.num_block + 1):
            out = getattr(self, f'B{index}')(out)
            block_outputs.append(out)
        out = self.LR_conv(self.c(torch.cat(block_outputs, dim=1))) + feature
        return self.upsampler(out) / self.img_range
