"""Low-bit checkpoints: quantized weights stored as packed integers, restored without pickled modules.

A file holds plain data only (tensors, numbers, strings, lists, dicts), so it loads with
``torch.load(weights_only=True)``: the packed weight codes of every quantized layer (and its learned rounding
flags, one bit per weight, where it has them) with the state of its quantizers and its bias, the layer plans,
the config, the float tensors of the rest of the model (the operand quantizers of attention matmuls included),
an optional architecture description, and a sha256 digest of all of it that is checked on load.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from ...config import OAQConfig
from ...errors import DataError, OAQError
from ...quant.attention import matmul_quantizers
from ...quant.convert import LayerPlan, convert
from ...quant.layers import QuantLayer, quant_layers
from ...quant.region_grid import MIN_STEP

FORMAT = 'oaq_plugin.quantized'
FORMAT_VERSION = 1
WEIGHT_KEY = 'module.weight'
# A learned rounding is stored apart from the state, packed one bit per weight (``rounding`` of a layer's entry):
# a network that rewrites a layer's weight in its forward (re-parameterized convolutions that fold their
# branches at every call) quantizes the rewritten float weight with these flags, not the loaded one.
ROUNDING_KEY = 'weight_quantizer.rounding'

PathLike = Union[str, os.PathLike]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes packed densely into bytes, least significant bit first.

    Four-bit codes land two per byte (the first code in the low nibble), eight-bit codes one per byte,
    other widths back to back across byte boundaries.
    """
    flat = codes.detach().reshape(-1).to(torch.int64).cpu()
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    bit_stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    padding = (-bit_stream.numel()) % 8
    if padding:
        bit_stream = torch.cat([bit_stream, bit_stream.new_zeros(padding)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
    return (bit_stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The ``numel`` codes of :func:`pack_codes`, as uint8."""
    data = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        codes = data
    else:
        bit_stream = ((data[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)
        bit_stream = bit_stream[:numel * bits].reshape(numel, bits)
        codes = (bit_stream << torch.arange(bits, dtype=torch.int64)).sum(dim=1)
    if codes.numel() < numel:
        raise DataError(f'packed weight holds {codes.numel()} codes, {numel} expected')
    return codes[:numel].to(torch.uint8)


def packed_num_bytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def _digest(value: Any, h) -> None:
    """Feed a canonical encoding of plain data to the hash ``h`` (dict keys sorted)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(b'T' + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(b'D%d' % len(value))
        for key in sorted(value, key=str):
            _digest(str(key), h)
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(b'L%d' % len(value))
        for item in value:
            _digest(item, h)
    elif isinstance(value, bool):
        h.update(b'B1' if value else b'B0')
    elif isinstance(value, int):
        h.update(b'I' + str(value).encode() + b';')
    elif isinstance(value, float):
        h.update(b'F' + struct.pack('<d', value))
    elif isinstance(value, str):
        encoded = value.encode()
        h.update(b'S%d:' % len(encoded) + encoded)
    elif value is None:
        h.update(b'N')
    else:
        raise OAQError(f'cannot store a {type(value).__name__} in a quantized checkpoint; only tensors, numbers, '
                       'strings, lists and dicts')


def payload_digest(payload: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != 'sha256'}, h)
    return h.hexdigest()


def plain_data(value: Any, where: str = 'arch') -> Any:
    """``value`` as built-in dicts/lists/scalars, so ``torch.load(weights_only=True)`` can read it back.

    Mappings such as mmengine's ``ConfigDict`` or BasicSR's ``OrderedDict`` options become dicts.
    """
    if isinstance(value, Mapping):
        return {str(k): plain_data(v, f'{where}.{k}') for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f'{where}[{i}]') for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise OAQError(f'{where}: a {type(value).__name__} cannot be stored in a quantized checkpoint; use numbers, '
                   'strings, lists and dicts')


def _layer_entry(layer: QuantLayer) -> Dict[str, Any]:
    codes, step, zero_point = layer.weight_quantizer.integer_codes(layer.weight)
    bits = layer.weight_quantizer.bits
    state, scalars = {}, {}
    for key, value in layer.state_dict().items():
        if key in (WEIGHT_KEY, ROUNDING_KEY):
            continue
        if value.dim() == 0 and value.dtype == torch.float32:
            # Python floats hold fp32 values exactly and spare the container a record per scalar.
            scalars[key] = float(value)
        else:
            state[key] = value.detach().cpu()
    return {
        'kind': type(layer.module).__name__,
        'role': layer.role,
        'w_bits': bits,
        'a_bits': layer.act_quantizer.bits,
        'weight_shape': list(layer.weight.shape),
        'weight_dtype': str(layer.weight.dtype).replace('torch.', ''),
        'codes': pack_codes(codes, bits),
        'rounding': (pack_codes(layer.weight_quantizer.rounding, 1)
                     if layer.weight_quantizer.rounding is not None else None),
        'step': step.detach().float().cpu(),
        'zero_point': float(zero_point),
        'state': state,
        'scalars': scalars,
        # Plain numbers of the input grid, for readers that run the layer without this package.
        'act_grid': layer.act_quantizer.grid().describe(),
        'act_quantizer': layer.act_quantizer.describe(),
    }


def _matmul_entries(qmodel: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Plain numbers of every attention-matmul operand grid, for readers that run without this package.

    The quantizers' state itself is part of ``float_state`` (it is not under a quantized layer).
    """
    return {name: {'a_bits': quantizer.bits, 'act_grid': quantizer.grid().describe(),
                   'act_quantizer': quantizer.describe()}
            for name, _, quantizer in matmul_quantizers(qmodel)}


def _quantized_prefixes(qmodel: nn.Module) -> Dict[str, QuantLayer]:
    return dict(quant_layers(qmodel))


def _float_state(qmodel: nn.Module, prefixes) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in qmodel.state_dict().items()
            if not any(k.startswith(p + '.') for p in prefixes)}


def save_quantized(qmodel: nn.Module, path: PathLike, config: OAQConfig, arch: Optional[Mapping[str, Any]] = None
                   ) -> Path:
    """Write ``qmodel`` as a low-bit checkpoint, atomically.

    Args:
        qmodel: A model made by :func:`oaq_plugin.quantize` or ``convert`` (it carries ``oaq_plans``).
        path: Destination file; its folder is created when missing.
        config: The config the model was quantized with.
        arch: Optional architecture description, e.g. BasicSR's ``network_g`` section
            ``{'type': 'SRVGGNetCompact', ...}``, passed back to the builder of :func:`load_quantized`.

    Returns:
        The path written.
    """
    plans = getattr(qmodel, 'oaq_plans', None)
    if plans is None:
        raise OAQError('this model has no layer plans (oaq_plans): save a model made by oaq_plugin.quantize')
    config = OAQConfig.coerce(config)
    layers = _quantized_prefixes(qmodel)
    payload: Dict[str, Any] = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'config': config.to_dict(),
        'arch': plain_data(arch) if arch is not None else None,
        'plans': [plan.to_dict() for plan in plans],
        'layers': {name: _layer_entry(layer) for name, layer in layers.items()},
        'matmuls': _matmul_entries(qmodel),
        'float_state': _float_state(qmodel, layers),
    }
    payload['sha256'] = payload_digest(payload)
    return save_atomically(payload, path)


def save_atomically(payload: Mapping[str, Any], path: PathLike) -> Path:
    """``torch.save`` of ``payload`` to ``path`` (its folder created when missing), never half-written."""
    return write_atomically(path, lambda stream: torch.save(payload, stream))


def write_atomically(path: PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through ``write(stream)`` (its folder created when missing), never half-written.

    The file gets the permissions a plain ``open()`` would give it (0644 under the usual umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A reader never sees a half-written file: write beside the target, then rename over it.
    handle, temporary = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(handle, 'wb') as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def read_verified(path: PathLike, what: str, tag: str, version: int, advice: str = '') -> Dict[str, Any]:
    """The contents of a file written with a format ``tag``, ``version`` and sha256 digest, checked.

    Args:
        path: The file.
        what: What the file is, for messages (e.g. ``'quantized checkpoint'``).
        tag: The expected ``format`` entry.
        version: The expected ``format_version`` entry.
        advice: Appended to every message (e.g. what to do about a bad file).

    Raises:
        DataError: The file is unreadable, not such a file, of another version, or its digest does not match.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # any failure to parse means a damaged or foreign file
        raise DataError(f'cannot read the {what} {path}: {type(error).__name__}: {error}{advice}') from None
    if not isinstance(payload, dict) or payload.get('format') != tag:
        raise DataError(f'{path} is not a {what} of oaq_plugin (no format tag {tag!r}){advice}')
    if payload.get('format_version') != version:
        raise DataError(f"{path} has format version {payload.get('format_version')}; this version reads "
                        f'{version}{advice}')
    try:
        digest = payload_digest(payload)
    except OAQError as error:
        raise DataError(f'{path} holds unexpected data: {error}{advice}') from None
    if digest != payload.get('sha256'):
        raise DataError(f'{path} is corrupt: its sha256 digest does not match its contents '
                        f"(stored {payload.get('sha256')}, computed {digest}){advice}")
    return payload


def read_quantized(path: PathLike) -> Dict[str, Any]:
    """The verified contents of a checkpoint written by :func:`save_quantized`.

    Raises:
        DataError: The file is missing, unreadable, not such a checkpoint, or its digest does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f'quantized checkpoint not found: {path}')
    return read_verified(path, 'quantized checkpoint', FORMAT, FORMAT_VERSION)


def _loaded_weight(layer: QuantLayer, codes: torch.Tensor, rounding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A float weight whose codes under the layer's (loaded) clip, and its learned ``rounding`` if any, are
    exactly ``codes``.

    ``code * step - clip`` is the value the weight quantizer maps to ``code`` by nearest rounding, so it
    reproduces every code, also for clips collapsed to the minimum step (all-zero channels). With a learned
    rounding (each code is ``floor(position) + flag``) the weight sits half a step inside the level below
    or at it: position ``code - flag + 1/2``.
    """
    quantizer = layer.weight_quantizer
    clip = torch.clamp(quantizer.clip.detach(), min=MIN_STEP)
    step = quantizer.step(clip)
    position = codes.to(torch.float32)
    if rounding is not None:
        position = position - rounding.to(torch.float32) + 0.5
    return position * step - clip


def load_quantized(path: PathLike, model: Optional[nn.Module] = None,
                   builder: Optional[Callable[[Dict[str, Any]], nn.Module]] = None) -> nn.Module:
    """Rebuild a quantized model from a checkpoint of :func:`save_quantized`.

    Args:
        path: The checkpoint.
        model: The float network skeleton (its weights are not used); a copy is converted.
        builder: Used when ``model`` is not given: called with the stored ``arch`` dict, returns the skeleton.

    Returns:
        The quantized model (fake-quant backend; see ``to_backend``). Its outputs equal the saved model's
        bit for bit on every backend; its float weights are the dequantized ones (half a step off them where
        the layer has learned rounding flags, which it gets back). Attention matmuls
        (``quantize_attention`` in the stored config) are wrapped again and get their stored quantizers.
    """
    payload = read_quantized(path)
    # Files written before the integer lattice existed hold float grids.
    config = OAQConfig.from_dict({'integer_lattice': False, **payload['config']})
    plans = [LayerPlan(**plan) for plan in payload['plans']]
    if model is None:
        arch = payload.get('arch')
        if builder is None or arch is None:
            raise OAQError(f'{path}: pass the float network as model=, or a builder= for its stored arch '
                           f'({arch!r})')
        model = builder(dict(arch))
    try:
        qmodel = convert(model, config, plans=plans)
    except (AttributeError, KeyError) as error:
        raise DataError(f'{path} does not fit this network: {error}') from None
    layers = _quantized_prefixes(qmodel)
    entries = payload['layers']
    if set(entries) != set(layers):
        raise DataError(f'{path} does not fit this network: quantized layers differ '
                        f'(only in the file: {sorted(set(entries) - set(layers))}, '
                        f'only in the network: {sorted(set(layers) - set(entries))})')
    stored_matmuls = set(payload.get('matmuls', {}))
    built_matmuls = {name for name, _, _ in matmul_quantizers(qmodel)}
    if stored_matmuls != built_matmuls:
        raise DataError(f'{path} does not fit this network: quantized attention matmuls differ '
                        f'(only in the file: {sorted(stored_matmuls - built_matmuls)}, '
                        f'only in the network: {sorted(built_matmuls - stored_matmuls)})')
    state = dict(payload['float_state'])
    for name, entry in entries.items():
        layer = layers[name]
        if list(layer.weight.shape) != entry['weight_shape']:
            raise DataError(f"{path}: layer '{name}' has weight shape {entry['weight_shape']} in the file, "
                            f'{list(layer.weight.shape)} in the network')
        for key, value in entry['state'].items():
            state[f'{name}.{key}'] = value
        for key, value in entry['scalars'].items():
            state[f'{name}.{key}'] = torch.tensor(value, dtype=torch.float32)
        state[f'{name}.{WEIGHT_KEY}'] = torch.zeros_like(layer.weight)
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f'{path} does not fit this network: missing {missing}, unexpected {unexpected}')
    with torch.no_grad():
        for name, entry in entries.items():
            layer = layers[name]
            bits = entry['w_bits']
            numel = math.prod(entry['weight_shape'])
            codes = unpack_codes(entry['codes'], bits, numel).reshape(entry['weight_shape']).to(layer.weight.device)
            rounding = entry.get('rounding')
            if rounding is not None:
                rounding = unpack_codes(rounding, 1, numel).reshape(entry['weight_shape']).to(layer.weight.device)
                layer.weight_quantizer.set_rounding(rounding)
            layer.weight.copy_(_loaded_weight(layer, codes, rounding).to(layer.weight.dtype))
            restored, _, _ = layer.weight_quantizer.integer_codes(layer.weight)
            if not torch.equal(restored, codes):
                raise DataError(f"{path}: layer '{name}' does not reproduce its stored weight codes")
    return qmodel


def _tensor_bytes(tensors) -> int:
    seen = set()
    total = 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def float_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers as stored (shared tensors counted once)."""
    return _tensor_bytes(model.state_dict().values())


def quantized_size_bytes(qmodel: nn.Module) -> int:
    """Bytes a deployment of ``qmodel`` stores: packed weight codes, quantizer parameters, biases, the rest.

    The checkpoint file adds only its container overhead and a copy of the per-channel steps.
    """
    layers = _quantized_prefixes(qmodel)
    total = _tensor_bytes(_float_state(qmodel, layers).values())
    for layer in layers.values():
        total += packed_num_bytes(layer.weight.numel(), layer.weight_quantizer.bits)
        total += _tensor_bytes(v for k, v in layer.state_dict().items() if k not in (WEIGHT_KEY, ROUNDING_KEY))
    return total
