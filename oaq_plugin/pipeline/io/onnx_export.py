"""ONNX export of a quantized network in standard ONNX ops, so that ONNX Runtime (or any engine) runs it.

Each quantized layer becomes its input's rounding, written with elementwise ops, followed by an integer
product where the grids allow one: with the input on an int8 integer lattice (``oaq.integer_lattice``)
and the weight codes in int8, a Conv2d is ``ConvInteger`` and a Linear ``MatMulInteger`` (both codes stored
as uint8 with 128 added, the form ONNX Runtime computes exactly on every CPU; -> int32), rescaled once per
output channel by ``unit * weight_scale`` and offset by the float bias. Other
layers (ConvTranspose2d, wider codes, grids off the lattice) decode their input to the exact levels and run
the float op on the decoded weight, as the reference backend does. Quantized attention matmuls get
QuantizeLinear/DequantizeLinear pairs on both operands. Height and width are dynamic.

Rounding forms (``rounding=``): ``exact`` repeats the reference's arithmetic op for op (region by region,
then ``Where``), so the codes are the reference's bit for bit; ``sum`` writes a continuous grid as a sum of
per-region QuantizeLinear of the input clamped to each region (fewer ops; a code can differ only for a
value within float rounding of a rounding boundary). Grids that are not continuous always use ``exact``.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...errors import OAQError, UnsupportedLayerError
from ...quant.activation import ActivationQuantizer
from ...quant.attention import matmul_quantizers
from ...quant.fast_fake_quant import _clamp_ranges
from ...quant.integer_lattice import weight_lattice
from ...quant.layers import QuantLayer, quant_layers
from ...quant.region_grid import RegionGrid
from .export import write_atomically

PathLike = Union[str, os.PathLike]
ROUNDING_FORMS = ('sum', 'exact')
# The TorchScript-based exporter writes opsets up to 20; 17 has every op used here.
OPSET = 17
UINT8_RANGE = (0, 255)
# ONNX TensorProto element type of the code Cast.
_UINT8 = 2
# Added to an int8 code to store it as uint8: ONNX Runtime's integer products are exact on every CPU only
# with both operands uint8 (``_emit_integer``).
UINT8_SHIFT = 128


@dataclass
class GridSpec:
    """A region grid as plain numbers, in code order.

    ``regions`` holds ``(offset, step, index_min, index_max, n_offset, n_step)`` per region (the ``n_*``
    are ``None`` off the lattice); ``clamp`` the per-region clamp intervals of a continuous grid.
    """

    regions: List[Tuple[float, float, int, int, Optional[int], Optional[int]]]
    middle_at: int
    low_threshold: Optional[float]
    high_threshold: Optional[float]
    unit: Optional[float]
    zero_point: int
    lattice_bits: Optional[int]
    clamp: Optional[List[Tuple[float, float]]]

    @classmethod
    def of(cls, grid: RegionGrid) -> 'GridSpec':
        regions = grid.regions()
        lattice = grid.lattice
        return cls(
            regions=[(_f32(r.offset), _f32(r.step), r.index_min, r.index_max,
                      getattr(r, 'n_offset', None) if lattice is not None else None,
                      getattr(r, 'n_step', None) if lattice is not None else None) for r in regions],
            middle_at=regions.index(grid.middle),
            low_threshold=_f32(grid.low_threshold) if grid.low is not None else None,
            high_threshold=_f32(grid.high_threshold) if grid.high is not None else None,
            unit=_f32(lattice.unit) if lattice is not None else None,
            zero_point=lattice.zero_point if lattice is not None else 0,
            lattice_bits=lattice.bits if lattice is not None else None,
            clamp=_clamp_ranges(grid))

    @property
    def int8(self) -> bool:
        """Whether the codes ``n + zero_point`` are int8."""
        return self.lattice_bits == 8


def _f32(t: torch.Tensor) -> float:
    return float(np.float32(float(t.detach())))


# --- graph building (inside symbolic functions) ---------------------------------------------------------

def _const(g, value, dtype=np.float32):
    return g.op('Constant', value_t=torch.from_numpy(np.asarray(value, dtype=dtype)))


def _region_indices(g, x, spec: GridSpec, r: int):
    """``clip(round((x - offset) / step), index_min, index_max)`` as float, the reference's arithmetic."""
    offset, step, index_min, index_max, _, _ = spec.regions[r]
    index = g.op('Round', g.op('Div', g.op('Sub', x, _const(g, offset)), _const(g, step)))
    return g.op('Clip', index, _const(g, float(index_min)), _const(g, float(index_max)))


def _select(g, x, spec: GridSpec, per_region: List):
    """The middle region's tensor, replaced by the low/high region's below/above the thresholds."""
    out = per_region[spec.middle_at]
    if spec.low_threshold is not None:
        out = g.op('Where', g.op('Less', x, _const(g, spec.low_threshold)), per_region[0], out)
    if spec.high_threshold is not None:
        out = g.op('Where', g.op('Greater', x, _const(g, spec.high_threshold)), per_region[-1], out)
    return out


def _lattice_n_exact(g, x, spec: GridSpec):
    """The lattice integer ``n`` of every value (float tensor), by the reference's arithmetic."""
    per_region = []
    for r, (_, _, _, _, n_offset, n_step) in enumerate(spec.regions):
        index = _region_indices(g, x, spec, r)
        per_region.append(g.op('Add', g.op('Mul', index, _const(g, float(n_step))), _const(g, float(n_offset))))
    return _select(g, x, spec, per_region)


def _levels_exact(g, x, spec: GridSpec):
    """The quantized value of every input (float), for a grid off the lattice: ``offset + index * step``."""
    per_region = []
    for r, (offset, step, _, _, _, _) in enumerate(spec.regions):
        index = _region_indices(g, x, spec, r)
        per_region.append(g.op('Add', _const(g, offset), g.op('Mul', index, _const(g, step))))
    return _select(g, x, spec, per_region)


def _sum_form(spec: GridSpec) -> bool:
    """Whether the grid can be written in the ``sum`` form: continuous, on a lattice, indices in uint8."""
    return (spec.clamp is not None and spec.unit is not None
            and all(r[2] >= 0 and r[3] <= 255 for r in spec.regions))


def _lattice_n_sum(g, x, spec: GridSpec) -> Tuple[object, int]:
    """``(partial, constant)`` with ``n = partial + constant``: a QuantizeLinear per region on the input
    clamped to it, each index scaled by the region's step in units (DequantizeLinear), summed."""
    parts = []
    constant = 0
    for r, ((start, end), (offset, step, index_min, index_max, n_offset, n_step)) in enumerate(
            zip(spec.clamp, spec.regions)):
        clamped = g.op('Clip', x, _const(g, start), _const(g, end))
        index = g.op('QuantizeLinear', g.op('Sub', clamped, _const(g, offset)), _const(g, step),
                     _const(g, 0, np.uint8))
        parts.append(g.op('DequantizeLinear', index, _const(g, float(n_step)), _const(g, 0, np.uint8)))
        constant += n_offset
        if r != spec.middle_at:
            # A tail clamped to the edge it shares with the middle region adds that edge's level again.
            edge = end if r < spec.middle_at else start
            edge_index = min(max(int(np.round(np.float32(np.float32(edge) - np.float32(offset))
                                              / np.float32(step))), index_min), index_max)
            constant -= n_offset + edge_index * n_step
    return (parts[0] if len(parts) == 1 else g.op('Sum', *parts)), constant


def _uint8_codes_sum(g, x, spec: GridSpec):
    """uint8 codes of a continuous lattice grid in the ``sum`` form."""
    total, constant = _lattice_n_sum(g, x, spec)
    zero_point = spec.zero_point + UINT8_SHIFT + constant
    if not UINT8_RANGE[0] <= zero_point <= UINT8_RANGE[1]:
        total = g.op('Add', total, _const(g, float(constant)))
        zero_point = spec.zero_point + UINT8_SHIFT
    return g.op('QuantizeLinear', total, _const(g, 1.0), _const(g, zero_point, np.uint8))


def _uint8_codes(g, x, spec: GridSpec, rounding: str):
    """``n + zero_point + 128`` (the int8 code stored as uint8) as a uint8 tensor."""
    if rounding == 'sum' and _sum_form(spec):
        return _uint8_codes_sum(g, x, spec)
    n = _lattice_n_exact(g, x, spec)
    return g.op('Cast', g.op('Add', n, _const(g, float(spec.zero_point + UINT8_SHIFT))), to_i=_UINT8)


def _quantized_values(g, x, spec: GridSpec, rounding: str):
    """The quantized input as floats (the exact levels)."""
    if spec.int8:
        # uint8 codes here too: ONNX Runtime may fuse this DequantizeLinear into an integer MatMul or Conv,
        # and only its uint8 x uint8 kernels are exact on every CPU (_emit_integer).
        codes = _uint8_codes(g, x, spec, rounding)
        return g.op('DequantizeLinear', codes, _const(g, spec.unit),
                    _const(g, spec.zero_point + UINT8_SHIFT, np.uint8))
    if spec.unit is not None:
        if rounding == 'sum' and _sum_form(spec):
            total, constant = _lattice_n_sum(g, x, spec)
            n = g.op('Add', total, _const(g, float(constant)))
        else:
            n = _lattice_n_exact(g, x, spec)
        return g.op('Mul', n, _const(g, spec.unit))
    return _levels_exact(g, x, spec)


# --- layers -------------------------------------------------------------------------------------------------

@dataclass
class LayerSpec:
    """What the export writes for one quantized layer (plain numbers and arrays)."""

    kind: str
    grid: GridSpec
    integer: bool
    weight_n: Optional[np.ndarray]          # int8 weight integers (integer path)
    channel_scale: Optional[np.ndarray]     # unit * weight scale per output channel (integer path)
    weight: np.ndarray                       # the decoded float weight (float path)
    bias: Optional[np.ndarray]
    stride: Tuple[int, ...] = (1, 1)
    padding: Tuple[int, ...] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: Tuple[int, ...] = (1, 1)
    groups: int = 1
    padding_mode: str = 'zeros'
    output_padding: Tuple[int, ...] = (0, 0)
    rounding: str = 'sum'
    # The layer itself, run by the reference backend while the exporter traces the network.
    layer: Optional[QuantLayer] = None


def _conv_pads(module: nn.Conv2d) -> Tuple[int, int, int, int]:
    if isinstance(module.padding, str):
        if module.padding == 'valid':
            return (0, 0, 0, 0)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return (totals[0] // 2, totals[1] // 2, totals[0] - totals[0] // 2, totals[1] - totals[1] // 2)
    ph, pw = module.padding
    return (ph, pw, ph, pw)


def layer_spec(layer: QuantLayer, rounding: str = 'sum', integer: bool = True) -> LayerSpec:
    """The export description of ``layer`` (its current grid and weight codes)."""
    from ...backends.reference import decode_weight
    module = layer.module
    grid = GridSpec.of(layer.act_quantizer.grid())
    codes, step, zero_point = layer.weight_quantizer.integer_codes(layer.weight)
    mapped = weight_lattice(codes, step, zero_point)
    kind = type(module).__name__
    can_integer = integer and grid.int8 and mapped.bits == 8 and isinstance(module, (nn.Conv2d, nn.Linear))
    bias = None if module.bias is None else module.bias.detach().float().cpu().numpy()
    spec = LayerSpec(kind=kind, grid=grid, integer=can_integer, weight_n=None, channel_scale=None,
                     weight=decode_weight(layer).detach().float().cpu().numpy(), bias=bias, rounding=rounding,
                     layer=layer)
    if can_integer:
        spec.weight_n = mapped.n.to(torch.int8).cpu().numpy()
        scale = (mapped.scale.reshape(-1).double() * grid.unit).float().cpu().numpy()
        channels = module.weight.shape[layer.weight_channel_axis]
        spec.channel_scale = np.broadcast_to(scale, (channels,)).astype(np.float32).copy()
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        spec.stride, spec.dilation, spec.groups = tuple(module.stride), tuple(module.dilation), module.groups
        if isinstance(module, nn.Conv2d):
            spec.padding = _conv_pads(module)
            spec.padding_mode = module.padding_mode
        else:
            ph, pw = module.padding
            spec.padding = (ph, pw, ph, pw)
            spec.output_padding = tuple(module.output_padding)
    return spec


_PAD_MODES = {'reflect': 'reflect', 'replicate': 'edge', 'circular': 'wrap'}


def _pad(g, x, spec: LayerSpec, value=None):
    """Explicit ``Pad`` of an NCHW tensor by ``spec.padding`` (mode of the layer; zeros take ``value``)."""
    top, left, bottom, right = spec.padding
    pads = _const(g, [0, 0, top, left, 0, 0, bottom, right], np.int64)
    mode = _PAD_MODES.get(spec.padding_mode, 'constant')
    if mode == 'constant':
        return g.op('Pad', x, pads, value if value is not None else _const(g, 0.0), mode_s='constant')
    return g.op('Pad', x, pads, mode_s=mode)


def _emit_integer(g, x, spec: LayerSpec):
    # Both operands uint8 (codes plus 128, zero points plus 128). ONNX Runtime's faster int8 x uint8 kernels
    # are not exact on x86 CPUs without VNNI: there VPMADDUBSW sums two byte products in a saturating int16
    # (255 x 127 x 2 > 32767), which moved a zoo model's Set5 PSNR by 4 dB on an AVX2 machine. Its uint8 x
    # uint8 kernels widen to int16 first and are exact on every CPU (docs/BENCHMARKS.md).
    codes = _uint8_codes(g, x, spec.grid, spec.rounding)
    zero = _const(g, spec.grid.zero_point + UINT8_SHIFT, np.uint8)
    weight_n = spec.weight_n.T if spec.kind == 'Linear' else spec.weight_n
    weight = _const(g, weight_n.astype(np.int16) + UINT8_SHIFT, np.uint8)
    weight_zero = _const(g, UINT8_SHIFT, np.uint8)
    if spec.kind == 'Linear':
        accumulator = g.op('MatMulInteger', codes, weight, zero, weight_zero)
        scale_shape = (-1,)
    else:
        pads = list(spec.padding)
        if spec.padding_mode != 'zeros' or (spec.grid.zero_point != 0 and any(pads)):
            # Padding must hold the code of a real zero (or the reflected codes): pad explicitly.
            codes = _pad(g, codes, spec, value=zero)
            pads = [0, 0, 0, 0]
        kernel = list(spec.weight_n.shape[2:])
        accumulator = g.op('ConvInteger', codes, weight, zero, weight_zero, kernel_shape_i=kernel,
                           strides_i=list(spec.stride), dilations_i=list(spec.dilation), group_i=spec.groups,
                           pads_i=[pads[0], pads[1], pads[2], pads[3]])
        scale_shape = (1, -1, 1, 1)
    # One DequantizeLinear per output channel turns the int32 sums into floats and rescales them in one pass.
    zeros = _const(g, np.zeros(spec.channel_scale.shape, np.int32), np.int32)
    out = g.op('DequantizeLinear', accumulator, _const(g, spec.channel_scale), zeros,
               axis_i=-1 if spec.kind == 'Linear' else 1)
    if spec.bias is not None:
        out = g.op('Add', out, _const(g, spec.bias.reshape(scale_shape)))
    return out


def _emit_float(g, x, spec: LayerSpec):
    values = _quantized_values(g, x, spec.grid, spec.rounding)
    weight = _const(g, spec.weight)
    if spec.kind == 'Linear':
        out = g.op('MatMul', values, _const(g, spec.weight.T.copy()))
        return out if spec.bias is None else g.op('Add', out, _const(g, spec.bias))
    inputs = [values, weight] + ([_const(g, spec.bias)] if spec.bias is not None else [])
    kernel = list(spec.weight.shape[2:])
    if spec.kind == 'ConvTranspose2d':
        return g.op('ConvTranspose', *inputs, kernel_shape_i=kernel, strides_i=list(spec.stride),
                    dilations_i=list(spec.dilation), group_i=spec.groups, pads_i=list(spec.padding),
                    output_padding_i=list(spec.output_padding))
    pads = list(spec.padding)
    if spec.padding_mode != 'zeros':
        inputs[0] = _pad(g, values, spec)
        pads = [0, 0, 0, 0]
    return g.op('Conv', *inputs, kernel_shape_i=kernel, strides_i=list(spec.stride), dilations_i=list(spec.dilation),
                group_i=spec.groups, pads_i=pads)


class _QuantLayerOp(torch.autograd.Function):
    """The quantized layer: the reference backend's result when traced, its ONNX subgraph when exported."""

    @staticmethod
    def forward(ctx, x, spec):
        from ...backends.reference import reference_forward
        return reference_forward(spec.layer, x)

    @staticmethod
    def symbolic(g, x, spec: LayerSpec):
        return _emit_integer(g, x, spec) if spec.integer else _emit_float(g, x, spec)


class _QuantizeOp(torch.autograd.Function):
    """An activation quantizer (of an attention-matmul operand): QuantizeLinear/DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, x, spec):
        grid = spec[2].grid()
        return grid.level_table().to(x.dtype)[grid.encode(x)]

    @staticmethod
    def symbolic(g, x, spec: Tuple[GridSpec, str, ActivationQuantizer]):
        return _quantized_values(g, x, spec[0], spec[1])


class _OnnxExecutor:
    name = 'onnx_export'

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec

    def __call__(self, layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
        return _QuantLayerOp.apply(x, self.spec)


@contextlib.contextmanager
def _export_mode(qmodel: nn.Module, rounding: str, integer: bool) -> Iterator[None]:
    """Layers and operand quantizers replaced by their export ops; everything restored after."""
    layers = quant_layers(qmodel)
    saved = [(layer, layer.executor, layer.executor_name, layer.mode) for _, layer in layers]
    patched: List[ActivationQuantizer] = []
    try:
        for _, layer in layers:
            if layer.mode != 'quant':
                raise OAQError(f"layer '{layer.layer_name}' is in mode '{layer.mode}'; export a model in quant mode")
            layer.executor = _OnnxExecutor(layer_spec(layer, rounding, integer))
        for _, matmul, quantizer in matmul_quantizers(qmodel):
            if matmul.mode != 'quant':
                continue
            spec = (GridSpec.of(quantizer.grid()), rounding, quantizer)
            quantizer.forward = (lambda s: (lambda x: _QuantizeOp.apply(x, s)))(spec)
            patched.append(quantizer)
        yield
    finally:
        for layer, executor, name, mode in saved:
            layer.executor, layer.executor_name, layer.mode = executor, name, mode
        for quantizer in patched:
            del quantizer.forward


def export_onnx(qmodel: Union[nn.Module, PathLike], path: PathLike, example_input: torch.Tensor, *,
                model: Optional[nn.Module] = None, rounding: str = 'sum', integer: bool = True,
                dynamic: bool = True, opset: int = OPSET) -> Path:
    """Write a quantized model as an ONNX file that ONNX Runtime runs (with int8 products where it can).

    Args:
        qmodel: A model from :func:`oaq_plugin.quantize` (or ``load_quantized``), or the path of a saved
            ``quantized.pth`` (rebuilt with ``model`` as the float skeleton, else from its stored arch).
        path: The ``.onnx`` file to write (its folder is created).
        example_input: An input the model accepts (N, C, H, W); only its layout matters with ``dynamic``.
        model: The float skeleton for a ``quantized.pth`` path.
        rounding: ``sum`` (fewer ops) or ``exact`` (the reference's arithmetic op for op); see the module.
        integer: Write ConvInteger/MatMulInteger where the grids allow; false decodes every input and runs
            float ops (the same values, no integer kernels).
        dynamic: Batch, height and width of input and output are dynamic axes.
        opset: ONNX opset.

    Returns:
        The path written.
    """
    if rounding not in ROUNDING_FORMS:
        raise OAQError(f"rounding must be one of {ROUNDING_FORMS}, got '{rounding}'")
    if isinstance(qmodel, (str, os.PathLike)):
        from ... import load_quantized
        qmodel = load_quantized(qmodel, model=model)
    if not quant_layers(qmodel):
        raise UnsupportedLayerError('this model has no quantized layer: export a model made by oaq_plugin.quantize')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example_input = example_input.detach().to(next(qmodel.parameters()).device)
    axes = {0: 'batch', 2: 'height', 3: 'width'} if example_input.dim() == 4 else {0: 'batch'}
    was_training = qmodel.training
    qmodel.eval()
    buffer = io.BytesIO()
    try:
        with _export_mode(qmodel, rounding, integer), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript-based exporter is the one that exports autograd functions' ONNX subgraphs.
            warnings.simplefilter('ignore')
            torch.onnx.export(qmodel, (example_input,), buffer, dynamo=False, opset_version=opset,
                              input_names=['input'], output_names=['output'],
                              dynamic_axes={'input': axes, 'output': dict(axes)} if dynamic else None,
                              do_constant_folding=True, autograd_inlining=False)
    finally:
        qmodel.train(was_training)
    return write_atomically(path, lambda stream: stream.write(buffer.getvalue()))


def onnx_session(path: Union[PathLike, bytes], threads: int = 1):
    """An ONNX Runtime CPU session of ``path`` (or a serialized model) with ``threads`` intra-op threads."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return onnxruntime.InferenceSession(model, options, providers=['CPUExecutionProvider'])


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    """The output of an ONNX Runtime session for one input tensor."""
    out = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})[0]
    return torch.from_numpy(out)


class OnnxRuntimeNetwork(nn.Module):
    """An exported network run by ONNX Runtime on the CPU, called like the PyTorch network it came from:
    a tensor in, a tensor out on the input's device (the ``onnxruntime`` validation backend of a run).

    Args:
        path: The ``.onnx`` file.
        device: Where inputs come from (the device of the network it replaces).
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
    """

    executor_name = 'onnxruntime'

    def __init__(self, path: PathLike, device: Union[str, torch.device] = 'cpu', threads: Optional[int] = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = onnx_session(self.path, threads or torch.get_num_threads())
        # Tells callers that look for a network's device where this one takes its inputs.
        self.register_buffer('anchor', torch.zeros(0, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_onnx(self.session, x).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"path='{self.path}'"
