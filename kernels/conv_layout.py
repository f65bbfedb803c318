"""Implicit-GEMM convolution layout shared by the Triton conv kernels: argument parsing, output size, the
tile's pixel indices and the weight matrix ``(groups, K, OC_group)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


def pair(value) -> Tuple[int, int]:
    """An int or a pair as ``(rows, columns)``."""
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def padding4(value) -> Tuple[int, int, int, int]:
    """Zero padding (an int, a pair ``(rows, columns)`` or ``(top, bottom, left, right)``) as four sides."""
    if isinstance(value, int):
        return value, value, value, value
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        return value[0], value[0], value[1], value[1]
    if len(value) == 4:
        return value
    raise ValueError(f'padding must be an int, a pair or (top, bottom, left, right), got {value}')


def conv_geometry(h: int, w: int, kernel_size: Tuple[int, int], stride, padding, dilation,
                  strict: bool = False) -> Tuple[Tuple[int, int], Tuple[int, int, int, int, int, int]]:
    """``((OH, OW), (stride_h, stride_w, pad_top, pad_left, dil_h, dil_w))`` of a convolution.

    Args:
        h, w: Input size.
        kernel_size: ``(KH, KW)``.
        stride, dilation: An int or a pair.
        padding: As :func:`padding4` takes it.
        strict: Also refuse a non-positive stride or dilation and a negative padding.
    """
    kh, kw = kernel_size
    sh, sw = pair(stride)
    top, bottom, left, right = padding4(padding)
    dh, dw = pair(dilation)
    if strict and (min(sh, sw, dh, dw) < 1 or min(top, bottom, left, right) < 0):
        raise ValueError('stride and dilation must be positive and padding non-negative')
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f'input {h}x{w} is too small for kernel {kh}x{kw} with padding {padding}')
    return (oh, ow), (sh, sw, top, left, dh, dw)


@dataclass
class WeightLayout:
    """What every packed conv/linear weight records besides its data: the float bias (``None`` when absent),
    the convolution's shape and whether two 4-bit values share a byte."""

    bias: Optional[torch.Tensor]
    out_channels: int
    in_channels_per_group: int
    kernel_size: Tuple[int, int]
    groups: int
    packed4: bool

    def check_linear(self) -> None:
        """Refuse a weight not packed from a Linear layer's ``(OC, C)`` matrix."""
        if self.kernel_size != (1, 1) or self.groups != 1:
            raise ValueError('a linear weight must be packed from an (OC, C) matrix with groups=1')


def weight_codes(codes: torch.Tensor, groups: int, bits: int, bits_note: str = '') -> torch.Tensor:
    """Conv codes ``(OC, C_group, KH, KW)`` (a Linear ``(OC, C)`` gains two unit axes), after checking the
    shape, ``1 <= bits <= 8`` (``bits_note`` ends that message) and that ``OC`` splits into ``groups``."""
    if codes.dim() == 2:
        codes = codes[:, :, None, None]
    if codes.dim() != 4:
        raise ValueError(f'weight codes must be (OC, C, KH, KW) or (OC, C), got shape {tuple(codes.shape)}')
    if not 1 <= bits <= 8:
        raise ValueError(f'weight bits must be in [1, 8]{bits_note}, got {bits}')
    if codes.shape[0] % groups:
        raise ValueError(f'{codes.shape[0]} output channels do not split into {groups} groups')
    return codes


def gemm_matrix(codes: torch.Tensor, groups: int) -> torch.Tensor:
    """``(OC, C_group, KH, KW)`` as ``(groups, K, OC_group)`` with ``K = tap * C_group + channel`` (taps in
    row-major kernel order)."""
    out_channels, c_group, kh, kw = codes.shape
    oc_group = out_channels // groups
    # (G, OCg, Cg, KH, KW) -> (G, KH, KW, Cg, OCg) -> (G, K, OCg): K runs over taps, then channels.
    matrix = codes.reshape(groups, oc_group, c_group, kh, kw).permute(0, 3, 4, 2, 1)
    return matrix.reshape(groups, kh * kw * c_group, oc_group)


def pack_nibbles(matrix: torch.Tensor, pad: int) -> torch.Tensor:
    """Two 4-bit values of a uint8 ``(groups, K, OC_group)`` per byte along ``K`` (even ``K`` in the low
    nibble); an odd ``K`` is completed with ``pad``."""
    if matrix.shape[1] % 2:
        matrix = torch.cat([matrix, matrix.new_full((matrix.shape[0], 1, matrix.shape[2]), pad)], dim=1)
    return matrix[:, 0::2] | (matrix[:, 1::2] << 4)


def per_channel(values: torch.Tensor, out_channels: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One ``dtype`` value per output channel from ``out_channels`` values or one for all."""
    values = values.detach().reshape(-1).to(dtype)
    if values.numel() == 1:
        values = values.expand(out_channels)
    if values.numel() != out_channels:
        raise ValueError(f'{name} has {values.numel()} elements for {out_channels} output channels')
    return values


@triton.jit
def output_rows(pid_m, M, OH, OW, stride_h, stride_w, pad_h, pad_w, BLOCK_M: tl.constexpr):
    """The tile's output pixels ``offs_m`` (batch, row, column), their mask, ``oh``, ``ow``, ``batch`` and the
    input position ``(ih0, iw0)`` of their first tap."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % OW
    rest = offs_m // OW
    oh = rest % OH
    batch = (rest // OH).to(tl.int64)
    return offs_m, m_ok, oh, ow, batch, oh * stride_h - pad_h, ow * stride_w - pad_w


@triton.jit
def tap_pixels(tap, KW, ih0, iw0, dil_h, dil_w, H, W, m_ok, x_rows, sxh, sxw):
    """For kernel tap ``tap`` (row-major): which input pixels lie inside the image, and their addresses."""
    kh = tap // KW
    kw = tap - kh * KW
    ih = ih0 + kh * dil_h
    iw = iw0 + kw * dil_w
    pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return pix_ok, x_rows + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
