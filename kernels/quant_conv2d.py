"""Triton implicit-GEMM conv2d with integer weights and the input's region-grid quantization fused in.

One program computes a ``BLOCK_M x BLOCK_N`` tile of the output of one group: rows are output pixels
(batch, row, column), columns are output channels, and the reduction runs over kernel taps, then input
channels. Each input value is mapped to its code on the layer's region grid and decoded through the
grid's level table inside the kernel, so no quantized copy of the input is ever written to memory.
Weights arrive as unsigned integer codes (one byte each, or two 4-bit codes per byte) and are decoded as
``(code - zero_point)``; the per-output-channel step multiplies the fp32 accumulator once at the end,
followed by the float bias. A Linear layer is the 1x1 case of the same kernel (see
:func:`quant_linear`).

The arithmetic it must reproduce is defined by ``oaq_plugin.backends.reference``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .conv_layout import (conv_geometry, gemm_matrix, output_rows, pack_nibbles, per_channel, tap_pixels,
                          WeightLayout, weight_codes)
from .region_codes import region_args, region_codes

DOT_PRECISIONS = ('ieee', 'tf32x3', 'tf32')


@triton.jit
def quant_conv2d_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, table_ptr, out_ptr,
        N, H, W, OH, OW, C_group, OC_group, KW, num_taps, num_codes,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sxn, sxc, sxh, sxw, son, soc, soh, sow,
        w_stride_g, w_stride_k,
        zero_point, grid,
        HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr, HAS_BIAS: tl.constexpr, PACKED4: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)

    offs_m, m_ok, oh, ow, batch, ih0, iw0 = output_rows(pid_m, N * OH * OW, OH, OW, stride_h, stride_w, pad_h, pad_w,
                                                         BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < OC_group

    x_rows = x_ptr + batch * sxn + (group * C_group).to(tl.int64) * sxc
    w_group = w_ptr + group.to(tl.int64) * w_stride_g

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, num_taps):
        pix_ok, pix_ptr = tap_pixels(tap, KW, ih0, iw0, dil_h, dil_w, H, W, m_ok, x_rows, sxh, sxw)
        for c0 in range(0, C_group, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < C_group
            a_mask = pix_ok[:, None] & c_ok[None, :]
            x = tl.load(pix_ptr[:, None] + offs_c[None, :].to(tl.int64) * sxc, mask=a_mask, other=0.0)
            x = x.to(tl.float32)

            code = region_codes(x, grid, num_codes, HAS_LOW, HAS_HIGH)
            a = tl.load(table_ptr + code, mask=a_mask, other=0.0)

            k = tap * C_group + offs_c
            w_mask = c_ok[:, None] & n_ok[None, :]
            if PACKED4:
                byte = tl.load(w_group + (k // 2)[:, None] * w_stride_k + offs_n[None, :], mask=w_mask, other=0)
                w_code = (byte.to(tl.int32) >> ((k % 2) * 4)[:, None]) & 15
            else:
                w_code = tl.load(w_group + k[:, None] * w_stride_k + offs_n[None, :], mask=w_mask, other=0)
            w = w_code.to(tl.float32) - zero_point
            acc += tl.dot(a, w, input_precision=PRECISION)

    channel = group * OC_group + offs_n
    scale = tl.load(scale_ptr + channel, mask=n_ok, other=0.0)
    out = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel, mask=n_ok, other=0.0)
        out = out + bias[None, :]
    out_offs = (batch * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow)[:, None] + \
        channel[None, :].to(tl.int64) * soc
    tl.store(out_ptr + out_offs, out, mask=m_ok[:, None] & n_ok[None, :])


@dataclass
class PackedWeight(WeightLayout):
    """Integer weight codes in the kernel's layout.

    ``codes`` is ``(groups, K, OC_group)`` uint8 with ``K = tap * C_group + channel`` (taps in row-major
    kernel order), or ``(groups, ceil(K / 2), OC_group)`` with two 4-bit codes per byte (even ``K`` in the
    low nibble). ``scale`` is the fp32 step of every output channel and ``zero_point`` the code of zero.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: float


@dataclass
class GridParams:
    """A region grid as the kernel reads it: per-region scalars and the level table.

    Each region is ``(offset, step, index_min, index_max, shift)`` with ``code = index + shift``;
    an absent low/high region is ``None``.
    """

    table: torch.Tensor
    middle: Tuple[float, float, float, float, float]
    low: Optional[Tuple[float, float, float, float, float]] = None
    high: Optional[Tuple[float, float, float, float, float]] = None
    low_threshold: float = float('-inf')
    high_threshold: float = float('inf')


def pack_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: float, bias: Optional[torch.Tensor],
                groups: int, bits: int) -> PackedWeight:
    """Rearrange conv codes ``(OC, C_group, KH, KW)`` (or Linear ``(OC, C)``) into the kernel's layout.

    Args:
        codes: Unsigned integer weight codes, below ``2 ** bits``.
        scale: Step per output channel (any shape with ``OC`` elements, or one element for all).
        zero_point: Code of the value zero: ``weight = (code - zero_point) * scale``.
        bias: Float bias of ``OC`` elements, or ``None``.
        groups: Convolution groups.
        bits: Weight bits; up to 4 bits are packed two codes per byte.
    """
    codes = weight_codes(codes, groups, bits)
    out_channels, c_group, kh, kw = codes.shape
    matrix = gemm_matrix(codes, groups).to(torch.uint8)
    packed4 = bits <= 4
    if packed4:
        matrix = pack_nibbles(matrix, 0)
    scale = per_channel(scale, out_channels, 'scale', torch.float32)
    if bias is not None:
        bias = bias.detach().reshape(-1).to(torch.float32).contiguous()
    return PackedWeight(codes=matrix.contiguous(), scale=scale.contiguous(), zero_point=float(zero_point),
                        bias=bias, out_channels=out_channels, in_channels_per_group=c_group,
                        kernel_size=(kh, kw), groups=groups, packed4=packed4)


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def default_blocks(m: int, oc_group: int, c_group: int, precision: str = 'ieee') -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``: tl.dot needs at least 16 on each side.

    BLOCK_M 128 suits the tensor-core ``tf32x3`` dot; the exact ``ieee`` dot runs on plain FMA units,
    where 128 rows ran about 13x slower than 64 on an H100 (docs/BENCHMARKS.md, EDSR layers).
    """
    block_n = max(16, min(64, triton.next_power_of_2(oc_group)))
    block_k = max(16, min(32, triton.next_power_of_2(c_group)))
    wide = not interpreting() and m > 4096 and precision != 'ieee'
    return (128 if wide else 64), block_n, block_k


def quant_conv2d(x: torch.Tensor, weight: PackedWeight, grid: GridParams, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), precision: str = 'ieee', blocks: Optional[Tuple[int, int, int]] = None,
                 num_warps: int = 4, num_stages: int = 2, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantized conv2d (zero padding) of an fp32 ``(N, C, H, W)`` input in any memory layout.

    Args:
        x: Float32 input; NCHW or channels-last strides are both read in place.
        weight: Codes from :func:`pack_weight`.
        grid: The input quantizer's grid (:class:`GridParams`).
        stride, dilation: As in ``torch.nn.functional.conv2d`` (an int or a pair).
        padding: Zero padding: an int, a pair ``(rows, columns)`` or ``(top, bottom, left, right)``.
        precision: ``tl.dot`` input precision: ``ieee`` (exact fp32 products), ``tf32x3`` or ``tf32``.
        blocks: ``(BLOCK_M, BLOCK_N, BLOCK_K)``; default from :func:`default_blocks`.
        num_warps, num_stages: Launch settings (ignored by the interpreter).
        out: Optional output tensor ``(N, OC, OH, OW)`` fp32, any strides.

    Returns:
        The fp32 output, channels-last when ``x`` is channels-last.
    """
    if x.dim() != 4:
        raise ValueError(f'input must be (N, C, H, W), got shape {tuple(x.shape)}')
    if x.dtype != torch.float32:
        raise ValueError(f'input must be float32, got {x.dtype}')
    if precision not in DOT_PRECISIONS:
        raise ValueError(f'precision must be one of {DOT_PRECISIONS}, got {precision!r}')
    n, c, h, w = x.shape
    groups = weight.groups
    if c != weight.in_channels_per_group * groups:
        raise ValueError(f'input has {c} channels; the weight expects {weight.in_channels_per_group * groups}')
    devices = {x.device, weight.codes.device, weight.scale.device, grid.table.device}
    if weight.bias is not None:
        devices.add(weight.bias.device)
    if len(devices) != 1:
        raise ValueError(f'input, weight codes, scales, bias and level table must share one device, got {devices}')
    (oh, ow), geometry = conv_geometry(h, w, weight.kernel_size, stride, padding, dilation)
    oc = weight.out_channels
    if out is None:
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = torch.empty((n, oc, oh, ow), device=x.device, dtype=torch.float32,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    elif out.shape != (n, oc, oh, ow) or out.dtype != torch.float32:
        raise ValueError(f'out must be float32 of shape {(n, oc, oh, ow)}, got {out.dtype} {tuple(out.shape)}')
    _launch(x, (n, h, w), (x.stride(0), x.stride(1), x.stride(2), x.stride(3)), weight, grid,
            (oh, ow), geometry, out, (out.stride(0), out.stride(1), out.stride(2), out.stride(3)),
            precision, blocks, num_warps, num_stages)
    return out


def quant_linear(x: torch.Tensor, weight: PackedWeight, grid: GridParams, precision: str = 'ieee',
                 blocks: Optional[Tuple[int, int, int]] = None, num_warps: int = 4,
                 num_stages: int = 2) -> torch.Tensor:
    """Quantized linear layer on an fp32 ``(..., C)`` input: the 1x1 conv over a 1 x M image of rows."""
    if x.dtype != torch.float32:
        raise ValueError(f'input must be float32, got {x.dtype}')
    weight.check_linear()
    c = weight.in_channels_per_group
    if x.shape[-1] != c:
        raise ValueError(f'input has {x.shape[-1]} features; the weight expects {c}')
    lead = x.shape[:-1]
    rows = x.reshape(-1, c)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    oc = weight.out_channels
    out = torch.empty((m, oc), device=x.device, dtype=torch.float32)
    if m > 0:
        # Rows become the W axis of a 1 x 1 x M image; channels stay the fastest axis.
        _launch(rows, (1, 1, m), (0, 1, 0, rows.stride(0)), weight, grid, (1, m), (1, 1, 0, 0, 1, 1), out,
                (0, 1, 0, oc), precision, blocks, num_warps, num_stages)
    return out.reshape(*lead, oc)


def _launch(x, sizes, x_strides, weight: PackedWeight, grid: GridParams, out_size, geometry, out, out_strides,
            precision, blocks, num_warps, num_stages) -> None:
    n, h, w = sizes
    oh, ow = out_size
    oc_group = weight.out_channels // weight.groups
    c_group = weight.in_channels_per_group
    m = n * oh * ow
    block_m, block_n, block_k = blocks or default_blocks(m, oc_group, c_group, precision)
    if min(block_m, block_n, block_k) < 16:
        raise ValueError(f'blocks must be at least 16 on each side (tl.dot), got {(block_m, block_n, block_k)}')
    if interpreting():
        # The interpreter has no tensor cores; tf32 rounding would not be reproduced there anyway.
        precision = 'ieee'
    kh, kw = weight.kernel_size
    launch_grid = (triton.cdiv(m, block_m), triton.cdiv(oc_group, block_n), weight.groups)
    bias = weight.bias if weight.bias is not None else weight.scale
    quant_conv2d_kernel[launch_grid](
        x, weight.codes, weight.scale, bias, grid.table, out,
        n, h, w, oh, ow, c_group, oc_group, kw, kh * kw, grid.table.numel(),
        *geometry,
        *x_strides, *out_strides,
        weight.codes.stride(0), weight.codes.stride(1),
        weight.zero_point, region_args(grid),
        HAS_LOW=grid.low is not None, HAS_HIGH=grid.high is not None, HAS_BIAS=weight.bias is not None,
        PACKED4=weight.packed4, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages)
