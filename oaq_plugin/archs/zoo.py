"""The real pretrained checkpoints in the shared folder: one table, and loaders that build them exactly."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from oaq_plugin import paths
from oaq_plugin.compat import install_basicsr_compat
from oaq_plugin.archs.carn_arch import CARNM
from oaq_plugin.archs.fsrcnn_arch import FSRCNN
from oaq_plugin.archs.imdn_arch import IMDN
from oaq_plugin.archs.pan_arch import PAN
from oaq_plugin.archs.rfdn_arch import RFDN

ZOO_ARCHS: dict = {
    'IMDN': IMDN,
    'PAN': PAN,
    'RFDN': RFDN,
    'CARNM': CARNM,
    'FSRCNN': FSRCNN,
}

# The one architecture of the zoo that BasicSR itself provides.
BASICSR_ARCH = 'SRVGGNetCompact'


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained checkpoint and how to build it.

    Args:
        key (str): Short name, e.g. ``'imdn_x2'``.
        arch_type (str): Architecture name as written in a BasicSR ``network_g: type:`` option.
        kwargs (Mapping[str, Any]): Constructor arguments of the architecture (shared: copy before changing).
        weight_path (str): Checkpoint path relative to the shared folder.
        scale (int): Upsampling factor.
        param_key (str | None): Key of the state dict inside the file, or None when the file is the state dict.
        psnr_set5 (float | None): Verified full-precision PSNR-Y on Set5 (shared/weights/README.md).
        psnr_set14 (float | None): Verified full-precision PSNR-Y on Set14.
    """

    key: str
    arch_type: str
    kwargs: Mapping[str, Any] = field(hash=False)
    weight_path: str
    scale: int
    param_key: Optional[str] = None
    psnr_set5: Optional[float] = None
    psnr_set14: Optional[float] = None

    def network_options(self) -> dict:
        """The ``network_g:`` section of a BasicSR option file that builds this architecture."""
        return {'type': self.arch_type, **self.kwargs}


_SRVGG_KWARGS = {'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_conv': 16, 'upscale': 4, 'act_type': 'prelu'}


def _entry(key: str, arch_type: str, kwargs: dict, weight_file: str, psnr_set5: float, psnr_set14: float,
           param_key: Optional[str] = None) -> ZooEntry:
    return ZooEntry(key, arch_type, kwargs, f'weights/{weight_file}', kwargs['upscale'], param_key, psnr_set5,
                    psnr_set14)


# PSNR-Y values: the "verified" column of shared/weights/README.md (Y channel, border crop = scale, uint8 output).
# FSRCNN's were measured on the Y channel alone, its native protocol; through the RGB pipeline it reads 0.015 to
# 0.033 dB higher. SRVGG is a GAN model for anime video: its bicubic-benchmark PSNR is low by design and serves only as a
# regression check; fidelity to its own full-precision output is the meaningful measure.
ZOO: Mapping[str, ZooEntry] = MappingProxyType({entry.key: entry for entry in (
    _entry('imdn_x2', 'IMDN', {'upscale': 2}, 'IMDN/IMDN_x2.pth', 38.00, 33.63),
    _entry('imdn_x3', 'IMDN', {'upscale': 3}, 'IMDN/IMDN_x3.pth', 34.36, 30.32),
    _entry('imdn_x4', 'IMDN', {'upscale': 4}, 'IMDN/IMDN_x4.pth', 32.21, 28.58),
    _entry('pan_x2', 'PAN', {'upscale': 2}, 'PAN/PANx2_DF2K.pth', 38.00, 33.59),
    _entry('pan_x3', 'PAN', {'upscale': 3}, 'PAN/PANx3_DF2K.pth', 34.40, 30.36),
    _entry('pan_x4', 'PAN', {'upscale': 4}, 'PAN/PANx4_DF2K.pth', 32.13, 28.61),
    _entry('rfdn_x4', 'RFDN', {'upscale': 4, 'img_range': 255.}, 'RFDN/RFDN_AIM.pth', 32.16, 28.65),
    _entry('carn_m_x2', 'CARNM', {'upscale': 2}, 'CARN/carn_m.pth', 37.68, 33.30),
    _entry('carn_m_x3', 'CARNM', {'upscale': 3}, 'CARN/carn_m.pth', 34.06, 30.10),
    _entry('carn_m_x4', 'CARNM', {'upscale': 4}, 'CARN/carn_m.pth', 31.88, 28.42),
    _entry('fsrcnn_x2', 'FSRCNN', {'upscale': 2}, 'FSRCNN/fsrcnn_x2.pth', 37.10, 32.71),
    _entry('fsrcnn_x3', 'FSRCNN', {'upscale': 3}, 'FSRCNN/fsrcnn_x3.pth', 32.59, 29.20),
    _entry('fsrcnn_x4', 'FSRCNN', {'upscale': 4}, 'FSRCNN/fsrcnn_x4.pth', 30.51, 27.55),
    _entry('srvgg_x4', BASICSR_ARCH, _SRVGG_KWARGS, 'SRVGGNetCompact/realesr-animevideov3.pth', 28.23, 26.11,
           param_key='params'),
)})


def get_zoo_entry(key: str) -> ZooEntry:
    """The table entry for ``key``, or a KeyError naming the closest valid key."""
    try:
        return ZOO[key]
    except KeyError:
        close = difflib.get_close_matches(key, ZOO.keys(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else '.'
        raise KeyError(f"unknown zoo checkpoint '{key}'{hint} Valid keys: {', '.join(ZOO)}") from None


def load_zoo_state_dict(entry: Union[ZooEntry, str], shared_root: Union[str, Path]) -> dict:
    """Read a zoo checkpoint as a plain state dict whose keys match the architecture's parameter names.

    Args:
        entry (ZooEntry | str): The table entry, or its key.
        shared_root (str | Path): The shared folder holding ``weights/``.

    Returns:
        dict: Tensor name to tensor, with any ``module.`` prefix removed.
    """
    if isinstance(entry, str):
        entry = get_zoo_entry(entry)
    path = Path(shared_root) / entry.weight_path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{entry.key}' not found at {path}; set OAQ_SHARED to the shared "
                                'folder that holds weights/')
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    if entry.param_key is not None:
        if entry.param_key not in loaded:
            raise KeyError(f"checkpoint {path} has no '{entry.param_key}' entry; it holds {sorted(loaded)[:5]}")
        loaded = loaded[entry.param_key]
    # Checkpoints saved from nn.DataParallel carry the wrapper's attribute name in front of every key.
    return {(name[len('module.'):] if name.startswith('module.') else name): tensor for name, tensor in loaded.items()}


def _arch_class(arch_type: str) -> type:
    if arch_type in ZOO_ARCHS:
        return ZOO_ARCHS[arch_type]
    if arch_type == BASICSR_ARCH:
        # Imported here so that the zoo's own architectures never need BasicSR.
        install_basicsr_compat()
        from basicsr.archs.srvgg_arch import SRVGGNetCompact
        return SRVGGNetCompact
    raise KeyError(f"no architecture named '{arch_type}'; known: {', '.join([*ZOO_ARCHS, BASICSR_ARCH])}")


def build_zoo_model(key: str, shared_root: Union[str, Path, None] = None) -> nn.Module:
    """Build a zoo checkpoint's network with its weights loaded strictly, in eval mode, on the CPU.

    Args:
        key (str): A key of ``ZOO``, e.g. ``'carn_m_x3'``.
        shared_root (str | Path | None): The shared folder; default ``oaq_plugin.paths.shared_root()``.

    Returns:
        nn.Module: The network, taking and returning RGB [0, 1] images.
    """
    entry = get_zoo_entry(key)
    if shared_root is None:
        shared_root = paths.shared_root()
    model = _arch_class(entry.arch_type)(**entry.kwargs)
    model.load_state_dict(load_zoo_state_dict(entry, shared_root), strict=True)
    return model.eval()
