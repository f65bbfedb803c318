"""One loader for any SR network: a checkpoint spandrel recognises, a BasicSR arch by name, or a zoo name.

``load_sr_model`` returns an :class:`SRModel` descriptor (module, scale, input range, channels) that the
CLI, the BasicSR ``Spandrel`` arch and library callers share. spandrel is imported only when a checkpoint
has to be recognised.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import DataError, OAQError, closest

SPANDREL_ARCH = 'Spandrel'
CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.ckpt', '.bin', '.safetensors')
# Where the state dict sits inside the checkpoints of BasicSR, Real-ESRGAN, KAIR and friends; the EMA copy first.
_STATE_KEYS = ('params_ema', 'params-ema', 'params', 'state_dict', 'model_state_dict', 'model', 'net', 'netG')
_LAYOUTS = {1: 'gray', 3: 'RGB', 4: 'RGBA'}
_PROBE_SIDE = 16


class CheckpointError(DataError):
    """A file that is not a readable checkpoint, or one whose network cannot be built."""


@dataclass(frozen=True)
class SRModel:
    """A float SR network and what a caller needs to feed it.

    Args:
        module: The network, in eval mode on the CPU, taking (N, input_channels, H, W).
        scale: Output size / input size.
        architecture: The architecture's name (spandrel's id, the BasicSR ``type``, or the zoo arch).
        source: Where it came from: the checkpoint path, ``zoo:<key>`` or ``basicsr:<type>``.
        network_g: A BasicSR ``network_g`` section that rebuilds the float network (stored in
            ``quantized.pth`` so that ``oaq_plugin.load_quantized`` can rebuild the skeleton).
        input_channels: Channels of the input image.
        output_channels: Channels of the output image.
        channel_layout: ``RGB`` (channel order of the input), ``gray`` or ``RGBA``.
        input_range: Value range of the input and the output, ``(0.0, 1.0)`` for every source here.
        size_multiple: Input height and width must be multiples of this (pad, run, crop).
        min_size: Smallest input side the network accepts.
        tags: Size tags spandrel gives (``64nf``, ``16nc`` ...); empty for other sources.
    """

    module: nn.Module
    scale: int
    architecture: str
    source: str
    network_g: Dict[str, Any]
    input_channels: int = 3
    output_channels: int = 3
    channel_layout: str = 'RGB'
    input_range: Tuple[float, float] = (0.0, 1.0)
    size_multiple: int = 1
    min_size: int = 0
    tags: Tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """One line: architecture, scale, channels, source."""
        tags = f" ({', '.join(self.tags)})" if self.tags else ''
        params = sum(p.numel() for p in self.module.parameters())
        return (f'{self.architecture}{tags} x{self.scale}, {self.channel_layout} in [{self.input_range[0]:g}, '
                f'{self.input_range[1]:g}], {params / 1e6:.3f} M parameters, from {self.source}')


def load_sr_model(spec: Union[str, os.PathLike, Mapping[str, Any]], checkpoint: Optional[Union[str, os.PathLike]]
                  = None, param_key: Optional[str] = None, scale: Optional[int] = None) -> SRModel:
    """Build a float SR network from a checkpoint, a BasicSR arch or a zoo name.

    Args:
        spec: One of
            - a checkpoint file (``.pth``/``.pt``/``.ckpt``/``.safetensors``) whose architecture spandrel
              recognises from its keys and shapes;
            - a zoo name (``srvgg_x4``, or ``zoo:srvgg_x4``; see ``oaq_plugin.archs.zoo.ZOO``);
            - a BasicSR ``network_g`` mapping (``{'type': 'EDSR', 'num_feat': 64, ...}``): the arch is built
              from BasicSR's ARCH_REGISTRY (the plugin's archs included), with ``checkpoint`` loaded into it.
        checkpoint: The weights for a BasicSR ``network_g`` spec (ignored otherwise).
        param_key: The entry of ``checkpoint`` holding the state dict (default: the first of ``params_ema``,
            ``params``, ``state_dict`` ... present, else the file itself).
        scale: The scale the caller expects; a network of another scale is refused.

    Returns:
        SRModel: the network in eval mode on the CPU, with its scale measured by running it once.

    Raises:
        CheckpointError: The file is not a checkpoint, its architecture is unknown, or it does not fit.
        DataError: The file does not exist.
        OAQError: The network's scale is not ``scale``.
    """
    if isinstance(spec, Mapping):
        loaded = _from_network_options(dict(spec), checkpoint, param_key)
    else:
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_file():
            loaded = _from_checkpoint(path)
        elif _zoo_key(text) is not None:
            loaded = _from_zoo(_zoo_key(text))
        elif path.is_dir():
            raise DataError(f'{path} is a folder, not a checkpoint file')
        elif path.suffix.lower() in CHECKPOINT_SUFFIXES or os.sep in text:
            raise DataError(f'no such checkpoint file: {path}')
        else:
            from .archs.zoo import ZOO
            raise DataError(f"'{text}' is neither a checkpoint file nor a zoo name"
                            f"{closest(text.removeprefix('zoo:'), ZOO)} (zoo names: {', '.join(ZOO)})")
    if scale is not None and int(scale) != loaded.scale:
        raise OAQError(f'{loaded.source} is a x{loaded.scale} network ({loaded.architecture}), but scale {scale} '
                       'was asked for')
    return loaded


def _zoo_key(text: str) -> Optional[str]:
    from .archs.zoo import ZOO
    key = text.removeprefix('zoo:')
    return key if key in ZOO else None


# -- reading a file -------------------------------------------------------------------------------------
def read_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """What a checkpoint file holds, read without running code from it; one line for anything else.

    PyTorch files are read with ``weights_only=True``, safetensors files with safetensors. A file that is
    neither (random bytes, an image, a truncated download) gets one line saying so, never torch's advice
    to retry with ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f'no such checkpoint file: {path}')
    kind = _file_kind(path)
    if kind == 'safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f'{path} is not a readable safetensors file: {_first_line(error)}') from None
    if kind == 'torch':
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises many types here; each becomes one line
            raise CheckpointError(f'{path} is not a loadable PyTorch checkpoint: {_torch_load_reason(error)}'
                                  ) from None
    raise CheckpointError(f'{path} is not a checkpoint: neither a PyTorch file (zip or pickle) nor safetensors '
                          f'({path.stat().st_size} bytes, starting {_head(path)!r})')


def read_state_dict(path: Union[str, os.PathLike], param_key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from their usual containers and ``module.`` prefixes.

    Args:
        path: The file (read by :func:`read_checkpoint`).
        param_key: The entry holding the state dict; by default the first of ``params_ema``, ``params``,
            ``state_dict``, ``model`` ... that is present, else the file's top level.
    """
    return _unwrap(read_checkpoint(path), Path(path), param_key)


def _file_kind(path: Path) -> str:
    with open(path, 'rb') as stream:
        head = stream.read(16)
    if head[:4] == b'PK\x03\x04' or head[:1] == b'\x80':  # torch's zip format, or a legacy pickle (PROTO opcode)
        return 'torch'
    if len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < path.stat().st_size:
        return 'safetensors'  # an 8-byte little-endian header length, then the JSON header
    return 'unknown'


def _head(path: Path) -> bytes:
    with open(path, 'rb') as stream:
        return stream.read(8)


def _first_line(error: BaseException) -> str:
    """``Type: first sentence`` of an error's message (libraries append paragraphs of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    sentence = lines[0].split('. ')[0].rstrip('.') if lines else ''
    return f'{type(error).__name__}: {sentence}'.rstrip(': ')


def _torch_load_reason(error: BaseException) -> str:
    # torch's weights-only refusal is many lines of advice ending in "set weights_only=False", which would run
    # code from the file: keep only what the file holds that is not plain data.
    text = str(error)
    found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', text) or re.search(r"global '?([\w.]+)'? was not",
                                                                                  text)
    if found:
        return (f'it holds a pickled Python object ({found.group(1)}) besides tensors; only plain state dicts '
                'are read, since unpickling objects can run code from the file')
    return _first_line(error)


def _unwrap(loaded: Any, path: Path, param_key: Optional[str]) -> Dict[str, torch.Tensor]:
    if param_key is not None:
        if not isinstance(loaded, Mapping) or param_key not in loaded:
            keys = sorted(map(str, loaded))[:8] if isinstance(loaded, Mapping) else []
            raise CheckpointError(f"{path} has no '{param_key}' entry (param_key); it holds {keys}")
        loaded = loaded[param_key]
    else:
        while isinstance(loaded, Mapping):
            inner = next((loaded[k] for k in _STATE_KEYS if isinstance(loaded.get(k), Mapping)), None)
            if inner is None and len(loaded) == 1 and isinstance(next(iter(loaded.values())), Mapping):
                inner = next(iter(loaded.values()))
            if inner is None:
                break
            loaded = inner
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f'{path} holds a {type(loaded).__name__}, not a state dict of tensors')
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f'{path} holds no tensor: it is not a network checkpoint '
                              f'(top-level keys: {sorted(map(str, loaded))[:8]})')
    for prefix in ('module.', 'netG.'):  # saved from nn.DataParallel, or inside a GAN trainer
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


# -- the three sources ----------------------------------------------------------------------------------
def _from_checkpoint(path: Path) -> SRModel:
    state = read_state_dict(path)
    descriptor = spandrel_descriptor(state, path)
    return _finish(descriptor.model, str(path), architecture=str(descriptor.architecture.id),
                   network_g={'type': SPANDREL_ARCH, 'checkpoint': str(path.resolve())},
                   expected_scale=descriptor.scale, input_channels=descriptor.input_channels,
                   output_channels=descriptor.output_channels,
                   size_multiple=descriptor.size_requirements.multiple_of,
                   min_size=descriptor.size_requirements.minimum, tags=tuple(descriptor.tags),
                   copy_input=True)


def spandrel_descriptor(state: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> Any:
    """spandrel's descriptor of a state dict, or one line naming what spandrel said."""
    try:
        import spandrel
    except ImportError:
        raise OAQError('recognising a checkpoint needs spandrel: pip install spandrel==0.4.2') from None
    registry = spandrel.MAIN_REGISTRY
    state = dict(state)
    matches = [support.architecture for support in registry.architectures('detection')
               if support.architecture.detect(state)]
    if not matches:
        keys = ', '.join(list(state)[:4])
        raise CheckpointError(f'{path}: spandrel {spandrel.__version__} does not recognise this architecture '
                              f'(UnsupportedModelError: none of its {len(registry)} detectors matches the state '
                              f'dict, whose first keys are {keys}); build it from a BasicSR arch instead')
    arch = matches[0]
    try:
        descriptor = arch.load(state)
    except Exception as error:  # noqa: BLE001 - an arch's loader fails in its own ways; name it and the cause
        raise CheckpointError(f'{path}: spandrel {spandrel.__version__} recognised a {arch.id} state dict but '
                              f'could not build it ({_first_line(error)})') from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise CheckpointError(f'{path} is a {arch.id} {descriptor.purpose} model: only image-to-image networks '
                              '(super-resolution, restoration) can be quantized here')
    return descriptor


def _from_zoo(key: str) -> SRModel:
    from .archs.zoo import build_zoo_model, get_zoo_entry
    entry = get_zoo_entry(key)
    try:
        module = build_zoo_model(key)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None
    return _finish(module, f'zoo:{key}', architecture=entry.arch_type, network_g=entry.network_options(),
                   expected_scale=entry.scale)


def _from_network_options(options: Dict[str, Any], checkpoint: Optional[Union[str, os.PathLike]],
                          param_key: Optional[str]) -> SRModel:
    arch_type = options.get('type')
    if not isinstance(arch_type, str):
        raise OAQError(f"a network spec needs 'type' (a BasicSR arch name), got {sorted(options)}")
    if arch_type == SPANDREL_ARCH:
        path = options.get('checkpoint') or checkpoint
        if not path:
            raise OAQError(f"network_g type {SPANDREL_ARCH} needs 'checkpoint' (or path.pretrain_network_g)")
        return load_sr_model(path)
    from .basicsr_plugin.registration import build_arch, register
    register()
    from basicsr.utils.registry import ARCH_REGISTRY
    if arch_type not in ARCH_REGISTRY:
        raise OAQError(f"no BasicSR arch named '{arch_type}'{closest(arch_type, ARCH_REGISTRY.keys())}")
    try:
        module = build_arch(options)
    except TypeError as error:
        raise OAQError(f'cannot build {arch_type} from {options}: {error}') from None
    source = f'basicsr:{arch_type}'
    if checkpoint is not None:
        state = read_state_dict(checkpoint, param_key)
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        wrong_shape = [k for k in sorted(expected & set(state)) if module.state_dict()[k].shape != state[k].shape]
        if missing or unexpected or wrong_shape:
            raise CheckpointError(f'{checkpoint} does not fit {arch_type} {options}: {len(missing)} missing keys '
                                  f'(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]}), '
                                  f'{len(wrong_shape)} of another shape (first: {wrong_shape[:3]}); is it a '
                                  'checkpoint of another architecture or size?')
        module.load_state_dict(state, strict=True)
        source = f'{checkpoint} as basicsr:{arch_type}'
    channels = next((int(options[k]) for k in ('num_in_ch', 'in_chans', 'in_nc', 'n_colors') if k in options), 3)
    return _finish(module, source, architecture=arch_type, network_g=options, input_channels=channels,
                   output_channels=channels)


def _finish(module: nn.Module, source: str, architecture: str, network_g: Dict[str, Any],
            expected_scale: Optional[int] = None, input_channels: int = 3, output_channels: int = 3,
            size_multiple: int = 1, min_size: int = 0, tags: Tuple[str, ...] = (),
            copy_input: bool = False) -> SRModel:
    module = module.float().cpu().eval()
    if copy_input:
        # Some community archs scale their input in place (spandrel's RCAN: ``x *= rgb_range``); the pipeline
        # feeds the same calibration batches many times, so each call gets its own copy.
        module.register_forward_pre_hook(_copy_input)
    scale = measure_scale(module, input_channels, output_channels, size_multiple, min_size, source)
    if expected_scale is not None and scale != expected_scale:
        raise CheckpointError(f'{source}: {architecture} was detected as x{expected_scale} but its output is x{scale}')
    return SRModel(module=module, scale=scale, architecture=architecture, source=source, network_g=network_g,
                   input_channels=input_channels, output_channels=output_channels,
                   channel_layout=_LAYOUTS.get(input_channels, f'{input_channels}-channel'),
                   size_multiple=max(int(size_multiple), 1), min_size=int(min_size), tags=tags)


def _copy_input(module: nn.Module, args: tuple) -> Optional[tuple]:
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(), *args[1:])
    return None


def probe_side(size_multiple: int = 1, min_size: int = 0) -> int:
    """The smallest input side at least 16 that the size requirements allow."""
    side = max(_PROBE_SIDE, min_size)
    return -(-side // size_multiple) * size_multiple


def measure_scale(module: nn.Module, input_channels: int, output_channels: int, size_multiple: int, min_size: int,
                  source: str) -> int:
    """The network's scale, by running it once on a small input; one line when it does not run."""
    side = probe_side(max(size_multiple, 1), min_size)
    probe = torch.rand(1, input_channels, side, side + size_multiple, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            output = module(probe)
    except Exception as error:  # noqa: BLE001 - any failure here means the network cannot be used as built
        raise CheckpointError(f'{source}: the network does not run on a {input_channels}-channel '
                              f'{probe.shape[-2]}x{probe.shape[-1]} input ({_first_line(error)})') from None
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CheckpointError(f'{source}: the network returns {got}, not an image batch (N, C, H, W); only '
                              'networks whose forward returns the output image can be quantized')
    height, width = probe.shape[-2:]
    scale = output.shape[-2] // height
    if scale < 1 or output.shape[-2] != height * scale or output.shape[-1] != width * scale:
        raise CheckpointError(f'{source}: output {tuple(output.shape[-2:])} is not an integer multiple of the '
                              f'input {(height, width)}')
    if output.shape[1] != output_channels:
        raise CheckpointError(f'{source}: the network returns {output.shape[1]} channels, {output_channels} expected')
    return int(scale)
