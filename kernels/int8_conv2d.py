"""Triton implicit-GEMM conv2d on integer lattice codes: int8 x int8 products, int32 accumulation.

A lattice grid has every level equal to ``unit * n`` with an integer ``n``; an activation is stored as the
int8 code ``p = n - zero`` (``zero`` is 0 for a grid whose integers fit int8, and shifts a grid of at
most 256 consecutive integers, such as ``0..255``, into int8). A weight is ``step * (mul * q + add)``
with an int8 ``q`` per weight and ``(mul, add)`` either ``(1, 0)`` (integer zero point) or ``(2, 1)``
(the half-integer zero point of a ``2^b``-level symmetric grid: odd integers). The kernel computes the
exact integer sum of products

    T = sum_k n_k * w_k = mul * sum_k p_k q_k + add * sum_k p_k + zero * sum_k w_k

with ``tl.dot`` on int8 operands into int32, where ``sum_k w_k`` is a per-output-channel constant. A
padded pixel holds ``p = -zero``, i.e. ``n = 0``, so zero padding stays exact for any ``zero``.

The epilogue scales ``T`` by ``unit * step[c]``, adds the float bias, applies the layer's activation
(ReLU, LeakyReLU, PReLU) and either stores fp32, or quantizes to the NEXT layer's lattice and stores its
int8 codes, so that between two convolutions only int8 codes travel through memory. A Linear layer is
the 1x1 case over a 1 x M image of rows (:func:`int8_linear`).

``int8_conv2d_reference`` and ``lattice_quantize_reference`` define the exact arithmetic in PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .conv_layout import (conv_geometry, gemm_matrix, output_rows, pack_nibbles, padding4, pair, per_channel,
                          tap_pixels, WeightLayout, weight_codes)
from .quant_conv2d import interpreting
from .region_codes import region_args, region_codes

ACTIVATIONS = ('identity', 'relu', 'leaky_relu', 'prelu')
OUTPUTS = ('float', 'codes', 'accumulators')
INT32_LIMIT = 2 ** 31 - 1


@triton.jit
def _lattice_codes(y, table_ptr, num_codes, out_zero, grid, HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr):
    """int32 storage codes ``n - zero`` of fp32 values ``y`` on a lattice grid (region, index, code, n)."""
    return tl.load(table_ptr + region_codes(y, grid, num_codes, HAS_LOW, HAS_HIGH)) - out_zero


@triton.jit
def int8_conv2d_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, shift_ptr, slope_ptr, table_ptr, out_ptr,
        H, W, M, OH, OW, C_group, OC_group, OC, KW, num_taps,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sxn, sxh, sxw, sxc,
        w_stride_g, w_stride_k,
        x_pad, leaky_slope, num_codes, out_zero, grid,
        W_MUL: tl.constexpr, W_ADD: tl.constexpr, X_SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr,
        PACKED4: tl.constexpr, ACTIVATION: tl.constexpr, OUTPUT: tl.constexpr,
        HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)

    offs_m, m_ok, oh, ow, batch, ih0, iw0 = output_rows(pid_m, M, OH, OW, stride_h, stride_w, pad_h, pad_w, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < OC_group

    x_rows = x_ptr + batch * sxn + (group * C_group).to(tl.int64) * sxc
    w_group = w_ptr + group.to(tl.int64) * w_stride_g

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for tap in range(0, num_taps):
        pix_ok, pix_ptr = tap_pixels(tap, KW, ih0, iw0, dil_h, dil_w, H, W, m_ok, x_rows, sxh, sxw)
        for c0 in range(0, C_group, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < C_group
            a = tl.load(pix_ptr[:, None] + offs_c[None, :].to(tl.int64) * sxc,
                        mask=pix_ok[:, None] & c_ok[None, :], other=0)
            if X_SHIFTED:
                # A padded pixel is the value 0, whose code is -zero; channels past the group stay 0.
                a = tl.where(pix_ok[:, None] | ~c_ok[None, :], a, x_pad).to(tl.int8)
            if W_ADD:
                row_sum += tl.sum(a.to(tl.int32), axis=1)

            k = tap * C_group + offs_c
            w_mask = c_ok[:, None] & n_ok[None, :]
            if PACKED4:
                byte = tl.load(w_group + (k // 2)[:, None] * w_stride_k + offs_n[None, :], mask=w_mask, other=0)
                nibble = (byte.to(tl.int32) >> ((k % 2) * 4)[:, None]) & 15
                # Offset binary: a nibble holds q + 8; rows past the group must be q = 0, not -8.
                b = tl.where(w_mask, nibble - 8, 0).to(tl.int8)
            else:
                b = tl.load(w_group + k[:, None] * w_stride_k + offs_n[None, :], mask=w_mask, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    channel = group * OC_group + offs_n
    total = acc * W_MUL
    if W_ADD:
        total += row_sum[:, None]
    if X_SHIFTED:
        shift_term = tl.load(shift_ptr + channel, mask=n_ok, other=0)
        total += shift_term[None, :]
    out_offs = offs_m[:, None].to(tl.int64) * OC + channel[None, :].to(tl.int64)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if OUTPUT == 2:
        tl.store(out_ptr + out_offs, total, mask=out_mask)
    else:
        scale = tl.load(scale_ptr + channel, mask=n_ok, other=0.0)
        y = total.to(tl.float32) * scale[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + channel, mask=n_ok, other=0.0)
            y = y + bias[None, :]
        if ACTIVATION == 1:
            y = tl.maximum(y, 0.0)
        elif ACTIVATION == 2:
            y = tl.where(y > 0, y, y * leaky_slope)
        elif ACTIVATION == 3:
            slope = tl.load(slope_ptr + channel, mask=n_ok, other=0.0)
            y = tl.where(y >= 0, y, y * slope[None, :])
        if OUTPUT == 1:
            codes = _lattice_codes(y, table_ptr, num_codes, out_zero, grid, HAS_LOW, HAS_HIGH)
            tl.store(out_ptr + out_offs, codes.to(tl.int8), mask=out_mask)
        else:
            tl.store(out_ptr + out_offs, y, mask=out_mask)


@triton.jit
def lattice_quantize_kernel(
        x_ptr, out_ptr, total, C, H, W, sxn, sxc, sxh, sxw, table_ptr, num_codes, out_zero, grid,
        HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    # The output is NHWC: channels vary fastest.
    c = offs % C
    rest = offs // C
    w = rest % W
    rest = rest // W
    h = rest % H
    n = rest // H
    x = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0).to(tl.float32)
    codes = _lattice_codes(x, table_ptr, num_codes, out_zero, grid, HAS_LOW, HAS_HIGH)
    tl.store(out_ptr + offs, codes.to(tl.int8), mask=mask)


Region = Tuple[float, float, float, float, float]


@dataclass
class LatticeGrid:
    """A region grid whose levels are ``unit * integers[code]``, as the kernels read it.

    Each region is ``(offset, step, index_min, index_max, shift)`` with ``code = index + shift`` (the
    layout of :class:`oaq_plugin.kernels.quant_conv2d.GridParams`); an absent low/high region is ``None``.
    A value is stored as the int8 code ``integers[code] - zero``.
    """

    unit: float
    zero: int
    integers: torch.Tensor
    middle: Region
    low: Optional[Region] = None
    high: Optional[Region] = None
    low_threshold: float = float('-inf')
    high_threshold: float = float('inf')

    def __post_init__(self) -> None:
        if self.integers.dtype != torch.int32 or self.integers.dim() != 1:
            raise ValueError(f'integers must be a 1-d int32 tensor, got {self.integers.dtype} '
                             f'{tuple(self.integers.shape)}')
        stored = self.integers.long() - int(self.zero)
        if stored.numel() and (int(stored.min()) < -128 or int(stored.max()) > 127):
            raise ValueError(f'lattice integers minus zero={self.zero} leave int8: '
                             f'[{int(stored.min())}, {int(stored.max())}]')

    @property
    def max_abs_integer(self) -> int:
        """Largest ``|n|`` a stored code can stand for (padding is 0)."""
        return max(abs(-128 + int(self.zero)), abs(127 + int(self.zero)))


@dataclass
class Int8Weight(WeightLayout):
    """Integer weights in the kernel's layout: ``weight = step[c] * (mul * q + add)``.

    ``data`` is ``(groups, K, OC_group)`` int8 ``q`` with ``K = tap * C_group + channel`` (taps in row-major
    kernel order), or, packed, ``(groups, ceil(K / 2), OC_group)`` uint8 with two ``q + 8`` nibbles per
    byte (even ``K`` in the low nibble). ``colsum`` is ``sum_k (mul * q + add)`` per output channel (int32),
    ``step`` the fp32 value of one weight integer per output channel.
    """

    data: torch.Tensor
    step: torch.Tensor
    colsum: torch.Tensor
    mul: int
    add: int
    max_abs_integer: int

    @property
    def reduction(self) -> int:
        """``K``: products summed per output value."""
        return self.kernel_size[0] * self.kernel_size[1] * self.in_channels_per_group

    def integers(self) -> torch.Tensor:
        """The weight integers ``mul * q + add`` as an int32 ``(OC, C_group, KH, KW)`` tensor."""
        groups, oc_group, c_group = self.groups, self.out_channels // self.groups, self.in_channels_per_group
        kh, kw = self.kernel_size
        if self.packed4:
            nibbles = torch.stack([self.data & 15, self.data >> 4], dim=2).reshape(groups, -1, oc_group)
            q = nibbles[:, :self.reduction].to(torch.int32) - 8
        else:
            q = self.data.to(torch.int32)
        w = q * self.mul + self.add
        # (G, K, OCg) -> (G, KH, KW, Cg, OCg) -> (G, OCg, Cg, KH, KW) -> (OC, Cg, KH, KW)
        w = w.reshape(groups, kh, kw, c_group, oc_group).permute(0, 4, 3, 1, 2)
        return w.reshape(self.out_channels, c_group, kh, kw).contiguous()


def pack_int8_weight(codes: torch.Tensor, step: torch.Tensor, zero_point: float, bias: Optional[torch.Tensor],
                     groups: int, bits: int) -> Int8Weight:
    """Turn unsigned weight codes ``(OC, C_group, KH, KW)`` (or Linear ``(OC, C)``) into :class:`Int8Weight`.

    Args:
        codes: Unsigned integer codes below ``2 ** bits``: ``weight = (code - zero_point) * step``.
        step: Step per output channel (any shape with ``OC`` elements, or one element for all).
        zero_point: An integer, or an integer plus one half (then weights are odd multiples of ``step / 2``).
        bias: Float bias of ``OC`` elements, or ``None``.
        groups: Convolution groups.
        bits: Weight bits, at most 8; up to 4 bits are packed two per byte.
    """
    codes = weight_codes(codes, groups, bits, ' for int8 weights')
    out_channels, c_group, kh, kw = codes.shape
    codes = codes.to(torch.int32)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise ValueError(f'weight codes must lie in [0, {2 ** bits - 1}] for {bits} bits')
    twice = 2.0 * float(zero_point)
    if twice != round(twice):
        raise ValueError(f'zero point {zero_point} is neither an integer nor a half-integer')
    if int(round(twice)) % 2 == 0:
        # code - zp is already an integer.
        mul, add, offset, unit_factor = 1, 0, int(round(float(zero_point))), 1.0
    else:
        # (code - m - 1/2) * step = (2 * (code - m - 1) + 1) * step / 2 with m = floor(zp).
        mul, add, offset, unit_factor = 2, 1, int(float(zero_point) - 0.5) + 1, 0.5
    q = codes - offset
    low, high = (-8, 7) if bits <= 4 else (-128, 127)
    if q.numel() and (int(q.min()) < low or int(q.max()) > high):
        raise ValueError(f'weight codes minus {offset} leave the {bits}-bit signed range [{low}, {high}]')
    integers = q * mul + add
    matrix = gemm_matrix(q, groups)
    packed4 = bits <= 4
    if packed4:
        # The pad nibble 8 is q = 0; the kernel masks it anyway.
        data = pack_nibbles((matrix + 8).to(torch.uint8), 8)
    else:
        data = matrix.to(torch.int8)
    step = per_channel(step, out_channels, 'step', torch.float64)
    if bias is not None:
        bias = bias.detach().reshape(-1).to(torch.float32).contiguous()
        if bias.numel() != out_channels:
            raise ValueError(f'bias has {bias.numel()} elements for {out_channels} output channels')
    return Int8Weight(data=data.contiguous(), step=(step * unit_factor).to(torch.float32).contiguous(),
                      colsum=integers.reshape(out_channels, -1).sum(dim=1).to(torch.int32).contiguous(),
                      mul=mul, add=add, max_abs_integer=int(integers.abs().max()) if integers.numel() else 0,
                      bias=bias, out_channels=out_channels, in_channels_per_group=c_group, kernel_size=(kh, kw),
                      groups=groups, packed4=packed4)


def default_blocks(m: int, oc_group: int, c_group: int) -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``; an int8 ``tl.dot`` needs at least 16 rows/columns and 32 deep."""
    block_n = max(16, min(128 if not interpreting() else 64, triton.next_power_of_2(oc_group)))
    block_k = max(32, min(64, triton.next_power_of_2(c_group)))
    if interpreting():
        # The interpreter's cost is per program and per dot: few, small tiles for tiny test shapes.
        return max(16, min(64, triton.next_power_of_2(m))), block_n, block_k
    return 128, block_n, block_k


def _grid_args(grid: Optional[LatticeGrid]) -> tuple:
    # (num_codes, out_zero, grid) of the kernels; without a grid the codes are never computed.
    if grid is None:
        return 1, 0, region_args(None)
    return grid.integers.numel(), int(grid.zero), region_args(grid)


def _activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f'activation must be one of {ACTIVATIONS}, got {activation!r}')
    return ACTIVATIONS.index(activation)


def _prelu_slopes(slope, out_channels: int, device) -> torch.Tensor:
    slope = torch.as_tensor(slope, dtype=torch.float32, device=device).detach().reshape(-1)
    if slope.numel() == 1:
        slope = slope.expand(out_channels)
    if slope.numel() != out_channels:
        raise ValueError(f'prelu slope has {slope.numel()} elements for {out_channels} output channels')
    return slope.contiguous()


def _check_overflow(weight: Int8Weight, x_grid: LatticeGrid) -> None:
    # |T| <= K * max|n| * max|w|; the partial dot sum_k p q is smaller still.
    bound = weight.reduction * x_grid.max_abs_integer * max(1, weight.max_abs_integer)
    if bound > INT32_LIMIT:
        raise ValueError(f'int32 accumulators could overflow: K={weight.reduction} products of |n| <= '
                         f'{x_grid.max_abs_integer} and |w| <= {weight.max_abs_integer}')


def int8_conv2d(x: torch.Tensor, weight: Int8Weight, x_grid: LatticeGrid, stride=1, padding=0, dilation=1,
                activation: str = 'identity', slope: Union[float, torch.Tensor] = 0.01,
                next_grid: Optional[LatticeGrid] = None, output: str = 'float',
                blocks: Optional[Tuple[int, int, int]] = None, num_warps: int = 4,
                num_stages: int = 3) -> torch.Tensor:
    """Convolution of NHWC int8 lattice codes with zero padding.

    Args:
        x: Contiguous ``(N, H, W, C)`` int8 codes ``n - x_grid.zero`` of the input.
        weight: From :func:`pack_int8_weight`.
        x_grid: The input's lattice (only ``unit`` and ``zero`` are read).
        stride, dilation: An int or a pair.
        padding: Zero padding: an int, a pair ``(rows, columns)`` or ``(top, bottom, left, right)``.
        activation: ``identity``, ``relu``, ``leaky_relu`` (``slope`` a float) or ``prelu`` (``slope`` one
            value or one per output channel).
        slope: Negative slope of ``leaky_relu`` / ``prelu``.
        next_grid: With ``output='codes'``: the lattice the result is quantized to.
        output: ``float`` (fp32), ``codes`` (int8 codes on ``next_grid``) or ``accumulators`` (the int32
            integer sums ``T``, before scale, bias and activation).
        blocks: ``(BLOCK_M, BLOCK_N, BLOCK_K)``; default from :func:`default_blocks`.
        num_warps, num_stages: Launch settings (ignored by the interpreter).

    Returns:
        ``(N, OH, OW, OC)``: fp32, int8 or int32 according to ``output``.
    """
    if x.dim() != 4:
        raise ValueError(f'input must be NHWC codes (N, H, W, C), got shape {tuple(x.shape)}')
    if x.dtype != torch.int8:
        raise ValueError(f'input codes must be int8, got {x.dtype}')
    if not x.is_contiguous():
        raise ValueError('input codes must be a contiguous (N, H, W, C) tensor')
    n, h, w, c = x.shape
    if c != weight.in_channels_per_group * weight.groups:
        raise ValueError(f'input has {c} channels; the weight expects {weight.in_channels_per_group * weight.groups}')
    (oh, ow), geometry = conv_geometry(h, w, weight.kernel_size, stride, padding, dilation, strict=True)
    out = _allocate(x, weight, x_grid, (n, oh, ow), activation, next_grid, output)
    if out.numel():
        _launch(x, (h, w, n * oh * ow, oh, ow), (x.stride(0), x.stride(1), x.stride(2), x.stride(3)), weight,
                x_grid, geometry, activation, slope, next_grid, output, out, blocks, num_warps,
                num_stages)
    return out


def int8_linear(x: torch.Tensor, weight: Int8Weight, x_grid: LatticeGrid, activation: str = 'identity',
                slope: Union[float, torch.Tensor] = 0.01, next_grid: Optional[LatticeGrid] = None,
                output: str = 'float', blocks: Optional[Tuple[int, int, int]] = None, num_warps: int = 4,
                num_stages: int = 3) -> torch.Tensor:
    """Linear layer on ``(..., C)`` int8 codes: the 1x1 convolution over a 1 x M image of rows."""
    if x.dtype != torch.int8:
        raise ValueError(f'input codes must be int8, got {x.dtype}')
    weight.check_linear()
    c = weight.in_channels_per_group
    if x.dim() < 1 or x.shape[-1] != c:
        raise ValueError(f'input has {x.shape[-1] if x.dim() else 0} features; the weight expects {c}')
    if not x.is_contiguous():
        raise ValueError('input codes must be contiguous')
    lead = x.shape[:-1]
    rows = x.reshape(-1, c)
    m = rows.shape[0]
    out = _allocate(x, weight, x_grid, (1, 1, m), activation, next_grid, output)
    if m > 0:
        _launch(rows, (1, m, m, 1, m), (0, 0, c, 1), weight, x_grid, (1, 1, 0, 0, 1, 1), activation, slope,
                next_grid, output, out, blocks, num_warps, num_stages)
    return out.reshape(*lead, weight.out_channels)


def _allocate(x, weight: Int8Weight, x_grid: LatticeGrid, sizes, activation, next_grid, output) -> torch.Tensor:
    if output not in OUTPUTS:
        raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')
    _activation_code(activation)
    if (output == 'codes') != (next_grid is not None):
        raise ValueError("next_grid is given exactly when output='codes'")
    tensors = [x, weight.data, weight.step, weight.colsum, x_grid.integers]
    tensors += [weight.bias] if weight.bias is not None else []
    tensors += [next_grid.integers] if next_grid is not None else []
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f'input, weight, bias and lattice tables must share one device, got {devices}')
    _check_overflow(weight, x_grid)
    dtype = {'float': torch.float32, 'codes': torch.int8, 'accumulators': torch.int32}[output]
    return torch.empty(tuple(sizes) + (weight.out_channels,), dtype=dtype, device=x.device)


def _launch(x, sizes, x_strides, weight: Int8Weight, x_grid: LatticeGrid, geometry, activation, slope, next_grid,
            output, out, blocks, num_warps, num_stages) -> None:
    h, w, m, oh, ow = sizes
    oc = weight.out_channels
    oc_group = oc // weight.groups
    c_group = weight.in_channels_per_group
    block_m, block_n, block_k = blocks or default_blocks(m, oc_group, c_group)
    if min(block_m, block_n) < 16 or block_k < 32:
        raise ValueError(f'blocks must be at least (16, 16, 32) for an int8 tl.dot, got {(block_m, block_n, block_k)}')
    kh, kw = weight.kernel_size
    act = _activation_code(activation)
    if act == 3:
        slopes = _prelu_slopes(slope, oc, x.device)
        leaky = 0.0
    else:
        slopes = weight.step
        leaky = float(slope) if act == 2 else 0.0
    # fp32 of the exact product unit * step: one rounding, as the reference does.
    scale = (weight.step.to(torch.float64) * float(x_grid.unit)).to(torch.float32)
    bias = weight.bias if weight.bias is not None else scale
    # zero * sum_k w_k, the per-channel term of a shifted input (bounded by the overflow check).
    shift_term = weight.colsum * int(x_grid.zero) if int(x_grid.zero) else weight.colsum
    table = next_grid.integers if next_grid is not None else x_grid.integers
    launch_grid = (triton.cdiv(m, block_m), triton.cdiv(oc_group, block_n), weight.groups)
    int8_conv2d_kernel[launch_grid](
        x, weight.data, scale, bias, shift_term, slopes, table, out,
        h, w, m, oh, ow, c_group, oc_group, oc, kw, kh * kw,
        *geometry, *x_strides,
        weight.data.stride(0), weight.data.stride(1),
        -int(x_grid.zero), leaky, *_grid_args(next_grid),
        W_MUL=weight.mul, W_ADD=weight.add, X_SHIFTED=int(x_grid.zero) != 0, HAS_BIAS=weight.bias is not None,
        PACKED4=weight.packed4, ACTIVATION=act, OUTPUT=OUTPUTS.index(output),
        HAS_LOW=next_grid is not None and next_grid.low is not None,
        HAS_HIGH=next_grid is not None and next_grid.high is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)


def lattice_quantize(x: torch.Tensor, grid: LatticeGrid, block: int = 1024) -> torch.Tensor:
    """int8 codes of a float input on ``grid``: NCHW (any strides) in, contiguous NHWC out; or ``(..., C)``
    in, the same shape out."""
    if not x.is_floating_point():
        raise ValueError(f'input must be floating point, got {x.dtype}')
    if x.device != grid.integers.device:
        raise ValueError(f'input on {x.device}, lattice table on {grid.integers.device}')
    if x.dim() == 4:
        n, c, h, w = x.shape
        strides = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
        out = torch.empty((n, h, w, c), dtype=torch.int8, device=x.device)
    else:
        c = x.shape[-1] if x.dim() else 1
        rows = x.reshape(-1, c)
        n, h, w = 1, 1, rows.shape[0]
        strides = (0, rows.stride(1), 0, rows.stride(0))
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        x = rows
    total = out.numel()
    if total:
        lattice_quantize_kernel[(triton.cdiv(total, block),)](
            x, out, total, c, h, w, *strides, grid.integers, *_grid_args(grid),
            HAS_LOW=grid.low is not None, HAS_HIGH=grid.high is not None, BLOCK=block)
    return out


# ---------------------------------------------------------------------------------------------------------------
# PyTorch reference: the exact arithmetic the kernels must reproduce.


def lattice_quantize_reference(x: torch.Tensor, grid: LatticeGrid) -> torch.Tensor:
    """int8 codes of ``x`` on ``grid``, in ``x``'s layout (the kernel's arithmetic, in fp32)."""
    x = x.to(torch.float32)

    def region_index(r: Region) -> torch.Tensor:
        offset, step, lo, hi, shift = r
        index = torch.clamp((x - offset) / step, lo, hi)
        return torch.round(index) + shift

    code = region_index(grid.middle)
    if grid.low is not None:
        code = torch.where(x < grid.low_threshold, region_index(grid.low), code)
    if grid.high is not None:
        code = torch.where(x > grid.high_threshold, region_index(grid.high), code)
    code = torch.nan_to_num(code, nan=0.0).clamp(0, grid.integers.numel() - 1).long()
    return (grid.integers.to(x.device)[code] - int(grid.zero)).to(torch.int8)


def int8_conv2d_reference(x: torch.Tensor, weight: Int8Weight, x_grid: LatticeGrid, stride=1, padding=0,
                          dilation=1, activation: str = 'identity', slope: Union[float, torch.Tensor] = 0.01,
                          next_grid: Optional[LatticeGrid] = None, output: str = 'float') -> torch.Tensor:
    """What :func:`int8_conv2d` computes, in PyTorch.

    The integer sums are computed as a float64 convolution of the integers ``n`` and ``w``: every product
    and partial sum is an integer far below 2^53, so the float64 result is exact.
    """
    if output not in OUTPUTS:
        raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')
    act = _activation_code(activation)
    integers = (x.to(torch.int64) + int(x_grid.zero)).permute(0, 3, 1, 2).to(torch.float64)
    top, bottom, left, right = padding4(padding)
    integers = F.pad(integers, (left, right, top, bottom))
    total = F.conv2d(integers, weight.integers().to(device=x.device, dtype=torch.float64), None, pair(stride), 0,
                     pair(dilation), weight.groups)
    total = total.permute(0, 2, 3, 1).round().to(torch.int64)
    if total.numel() and int(total.abs().max()) > INT32_LIMIT:
        raise ValueError('the integer sums overflow int32')
    total = total.to(torch.int32)
    if output == 'accumulators':
        return total
    scale = (weight.step.to(torch.float64) * float(x_grid.unit)).to(torch.float32).to(x.device)
    y = total.to(torch.float32) * scale
    if weight.bias is not None:
        y = y + weight.bias.to(x.device)
    if act == 1:
        y = torch.clamp_min(y, 0.0)
    elif act == 2:
        y = torch.where(y > 0, y, y * torch.tensor(float(slope), dtype=torch.float32))
    elif act == 3:
        y = torch.where(y >= 0, y, y * _prelu_slopes(slope, weight.out_channels, x.device))
    if output == 'codes':
        if next_grid is None:
            raise ValueError("output='codes' needs next_grid")
        return lattice_quantize_reference(y, next_grid)
    return y


def int8_linear_reference(x: torch.Tensor, weight: Int8Weight, x_grid: LatticeGrid, **kwargs) -> torch.Tensor:
    """What :func:`int8_linear` computes, in PyTorch."""
    c = weight.in_channels_per_group
    out = int8_conv2d_reference(x.reshape(1, 1, -1, c), weight, x_grid, **kwargs)
    return out.reshape(*x.shape[:-1], weight.out_channels)
