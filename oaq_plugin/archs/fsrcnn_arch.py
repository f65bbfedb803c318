"""FSRCNN (Dong et al., ECCV 2016): the luma network, and an RGB version for BasicSR's pipeline."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# ITU-R BT.601 on [0, 1] RGB, as BasicSR's `rgb2ycbcr` (and MATLAB's) computes it: rows are R, G, B weights.
_RGB_TO_YCBCR = torch.tensor([[65.481, -37.797, 112.0], [128.553, -74.203, -93.786], [24.966, 112.0, -18.214]],
                             dtype=torch.float64) / 255.
_YCBCR_OFFSET = torch.tensor([16., 128., 128.], dtype=torch.float64) / 255.


class FSRCNNLuma(nn.Module):
    """FSRCNN on one channel (luma Y in [0, 1]), as in the paper and the released weights.

    Feature extraction (5x5, ``d`` channels), shrinking (1x1 to ``s``), ``m`` 3x3 mapping layers, expanding
    (1x1 back to ``d``), each followed by a PReLU, then a 9x9 transposed conv with stride ``upscale``.

    Args:
        num_in_ch (int): Channel number of input and output. Default: 1.
        num_feat (int): ``d``, channels of the feature extraction and expanding layers. Default: 56.
        num_shrink_feat (int): ``s``, channels of the mapping layers. Default: 12.
        num_map (int): ``m``, number of 3x3 mapping layers. Default: 4.
        upscale (int): Upsampling factor, the stride of the transposed conv. Default: 4.
    """

    def __init__(self,
                 num_in_ch: int = 1,
                 num_feat: int = 56,
                 num_shrink_feat: int = 12,
                 num_map: int = 4,
                 upscale: int = 4) -> None:
        super().__init__()
        self.upscale = upscale
        self.first_part = nn.Sequential(nn.Conv2d(num_in_ch, num_feat, 5, padding=2), nn.PReLU(num_feat))
        mid: list[nn.Module] = [nn.Conv2d(num_feat, num_shrink_feat, 1), nn.PReLU(num_shrink_feat)]
        for _ in range(num_map):
            mid += [nn.Conv2d(num_shrink_feat, num_shrink_feat, 3, padding=1), nn.PReLU(num_shrink_feat)]
        mid += [nn.Conv2d(num_shrink_feat, num_feat, 1), nn.PReLU(num_feat)]
        self.mid_part = nn.Sequential(*mid)
        # padding 4 and output_padding upscale-1 make the output exactly upscale times the input size.
        self.last_part = nn.ConvTranspose2d(num_feat, num_in_ch, 9, stride=upscale, padding=4,
                                            output_padding=upscale - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_part(self.mid_part(self.first_part(x)))


class FSRCNN(FSRCNNLuma):
    """FSRCNN for RGB [0, 1] images: the luma network on Y, bicubic Cb/Cr, back to RGB.

    A subclass rather than a wrapper holding the luma network, so that its parameter names are exactly
    those of the released single-channel checkpoints and BasicSR's loader takes them unchanged. Colour
    conversion is BT.601 as BasicSR's ``rgb2ycbcr`` computes it, and its exact inverse; the output is not
    clamped (BasicSR clamps when converting to an image).

    Args:
        num_feat (int): ``d``, channels of the feature extraction and expanding layers. Default: 56.
        num_shrink_feat (int): ``s``, channels of the mapping layers. Default: 12.
        num_map (int): ``m``, number of 3x3 mapping layers. Default: 4.
        upscale (int): Upsampling factor. Default: 4.
    """

    def __init__(self, num_feat: int = 56, num_shrink_feat: int = 12, num_map: int = 4, upscale: int = 4) -> None:
        super().__init__(num_in_ch=1, num_feat=num_feat, num_shrink_feat=num_shrink_feat, num_map=num_map,
                         upscale=upscale)
        # Non-persistent: fixed constants, so the state dict stays identical to the luma checkpoint.
        self.register_buffer('rgb_to_ycbcr', _RGB_TO_YCBCR.float(), persistent=False)
        self.register_buffer('ycbcr_offset', _YCBCR_OFFSET.float(), persistent=False)
        self.register_buffer('ycbcr_to_rgb', torch.linalg.inv(_RGB_TO_YCBCR).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError(f'FSRCNN expects RGB input of shape (N, 3, H, W), got {tuple(x.shape)}; '
                             'use FSRCNNLuma for a single Y channel')
        ycbcr = torch.einsum('nchw,cd->ndhw', x, self.rgb_to_ycbcr) + self.ycbcr_offset.view(1, 3, 1, 1)
        luma = super().forward(ycbcr[:, :1])
        chroma = F.interpolate(ycbcr[:, 1:], size=luma.shape[-2:], mode='bicubic', align_corners=False)
        ycbcr = torch.cat([luma, chroma], dim=1) - self.ycbcr_offset.view(1, 3, 1, 1)
        return torch.einsum('nchw,cd->ndhw', ycbcr, self.ycbcr_to_rgb)
