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

# Adding then subtracting 1.5 * 2^23 rounds an fp32 of magnitude below 2^22 to the nearest integer,
# ties to even, exactly as torch.round does; libdevice.rint is not available in the interpreter.
ROUND_MAGIC = tl.constexpr(12582912.0)
DOT_PRECISIONS = ('ieee', 'tf32x3', 'tf32')


@triton.jit
def quant_conv2d_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, table_ptr, out_ptr,
        N, H, W, OH, OW, C_group, OC_group, KW, num_taps, num_codes,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sxn, sxc, sxh, sxw, son, soc, soh, sow,
        w_stride_g, w_stride_k,
        zero_point,
        mid_offset, mid_step, mid_min, mid_max, mid_shift,
        low_threshold, low_offset, low_step, low_min, low_max, low_shift,
        high_threshold, high_offset, high_step, high_min, high_max, high_shift,
        HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr, HAS_BIAS: tl.constexpr, PACKED4: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * OH * OW
    ow = offs_m % OW
    rest = offs_m // OW
    oh = rest % OH
    batch = (rest // OH).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < OC_group
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    x_rows = x_ptr + batch * sxn + (group * C_group).to(tl.int64) * sxc
    w_group = w_ptr + group.to(tl.int64) * w_stride_g

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, num_taps):
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix_ptr = x_rows + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        for c0 in range(0, C_group, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < C_group
            a_mask = pix_ok[:, None] & c_ok[None, :]
            x = tl.load(pix_ptr[:, None] + offs_c[None, :].to(tl.int64) * sxc, mask=a_mask, other=0.0)
            x = x.to(tl.float32)

            # Pick each value's region first, so one division serves all three regions.
            offset = tl.zeros_like(x) + mid_offset
            step = tl.zeros_like(x) + mid_step
            lo = tl.zeros_like(x) + mid_min
            hi = tl.zeros_like(x) + mid_max
            shift = tl.zeros_like(x) + mid_shift
            if HAS_LOW:
                below = x < low_threshold
                offset = tl.where(below, low_offset, offset)
                step = tl.where(below, low_step, step)
                lo = tl.where(below, low_min, lo)
                hi = tl.where(below, low_max, hi)
                shift = tl.where(below, low_shift, shift)
            if HAS_HIGH:
                above = x > high_threshold
                offset = tl.where(above, high_offset, offset)
                step = tl.where(above, high_step, step)
                lo = tl.where(above, high_min, lo)
                hi = tl.where(above, high_max, hi)
                shift = tl.where(above, high_shift, shift)
            # Correctly rounded division: the code must match torch's (x - offset) / step bit for bit.
            index = tl.math.div_rn(x - offset, step)
            # Clamping to integer bounds before rounding gives the same index as rounding first.
            index = tl.minimum(tl.maximum(index, lo), hi)
            index = (index + ROUND_MAGIC) - ROUND_MAGIC
            code = (index + shift).to(tl.int32)
            # NaN inputs would otherwise index outside the table.
            code = tl.minimum(tl.maximum(code, 0), num_codes - 1)
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
class PackedWeight:
    """Integer weight codes in the kernel's layout.

    ``codes`` is ``(groups, K, OC_group)`` uint8 with ``K = tap * C_group + channel`` (taps in row-major
    kernel order), or ``(groups, ceil(K / 2), OC_group)`` with two 4-bit codes per byte (even ``K`` in the
    low nibble). ``scale`` is the fp32 step of every output channel and ``zero_point`` the code of zero.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: float
    bias: Optional[torch.Tensor]
    out_channels: int
    in_channels_per_group: int
    kernel_size: Tuple[int, int]
    groups: int
    packed4: bool


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
    if codes.dim() == 2:
        codes = codes[:, :, None, None]
    if codes.dim() != 4:
        raise ValueError(f'weight codes must be (OC, C, KH, KW) or (OC, C), got shape {tuple(codes.shape)}')
    if not 1 <= bits <= 8:
        raise ValueError(f'weight bits must be in [1, 8], got {bits}')
    out_channels, c_group, kh, kw = codes.shape
    if out_channels % groups:
        raise ValueError(f'{out_channels} output channels do not split into {groups} groups')
    oc_group = out_channels // groups
    # (G, OCg, Cg, KH, KW) -> (G, KH, KW, Cg, OCg) -> (G, K, OCg): K runs over taps, then channels.
    matrix = codes.reshape(groups, oc_group, c_group, kh, kw).permute(0, 3, 4, 2, 1)
    matrix = matrix.reshape(groups, kh * kw * c_group, oc_group).to(torch.uint8)
    packed4 = bits <= 4
    if packed4:
        if matrix.shape[1] % 2:
            matrix = torch.cat([matrix, matrix.new_zeros(groups, 1, oc_group)], dim=1)
        matrix = matrix[:, 0::2] | (matrix[:, 1::2] << 4)
    scale = scale.detach().reshape(-1).to(torch.float32)
    if scale.numel() == 1:
        scale = scale.expand(out_channels)
    if scale.numel() != out_channels:
        raise ValueError(f'scale has {scale.numel()} elements for {out_channels} output channels')
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


def _region_args(region: Optional[Tuple[float, ...]]) -> Tuple[float, ...]:
    return tuple(float(v) for v in region) if region is not None else (0.0, 1.0, 0.0, 0.0, 0.0)


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
    kh, kw = weight.kernel_size
    sh, sw = _pair(stride)
    top, bottom, left, right = _padding(padding)
    dh, dw = _pair(dilation)
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f'input {h}x{w} is too small for kernel {kh}x{kw} with padding {padding}')
    oc = weight.out_channels
    if out is None:
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = torch.empty((n, oc, oh, ow), device=x.device, dtype=torch.float32,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    elif out.shape != (n, oc, oh, ow) or out.dtype != torch.float32:
        raise ValueError(f'out must be float32 of shape {(n, oc, oh, ow)}, got {out.dtype} {tuple(out.shape)}')
    _launch(x, (n, h, w), (x.stride(0), x.stride(1), x.stride(2), x.stride(3)), weight, grid,
            (oh, ow), (sh, sw, top, left, dh, dw), out, (out.stride(0), out.stride(1), out.stride(2), out.stride(3)),
            precision, blocks, num_warps, num_stages)
    return out


def quant_linear(x: torch.Tensor, weight: PackedWeight, grid: GridParams, precision: str = 'ieee',
                 blocks: Optional[Tuple[int, int, int]] = None, num_warps: int = 4,
                 num_stages: int = 2) -> torch.Tensor:
    """Quantized linear layer on an fp32 ``(..., C)`` input: the 1x1 conv over a 1 x M image of rows."""
    if x.dtype != torch.float32:
        raise ValueError(f'input must be float32, got {x.dtype}')
    if weight.kernel_size != (1, 1) or weight.groups != 1:
        raise ValueError('a linear weight must be packed from an (OC, C) matrix with groups=1')
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


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _padding(value) -> Tuple[int, int, int, int]:
    if isinstance(value, int):
        return value, value, value, value
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        return value[0], value[0], value[1], value[1]
    if len(value) == 4:
        return value
    raise ValueError(f'padding must be an int, a pair or (top, bottom, left, right), got {value}')


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
        weight.zero_point,
        *_region_args(grid.middle),
        float(grid.low_threshold), *_region_args(grid.low),
        float(grid.high_threshold), *_region_args(grid.high),
        HAS_LOW=grid.low is not None, HAS_HIGH=grid.high is not None, HAS_BIAS=weight.bias is not None,
        PACKED4=weight.packed4, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages)
