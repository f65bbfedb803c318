"""``network_g: {type: Spandrel}``: any checkpoint spandrel recognises, as a BasicSR arch.

The architecture and its size are read from the checkpoint itself, so the option file names only the
file: in ``network_g.checkpoint``, or in ``path.pretrain_network_g`` (which ``OAQModel`` passes on).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from ..errors import ConfigError
from ..loading import SPANDREL_ARCH, load_sr_model

# Set on a network built here: OAQModel does not read the same file a second time through BasicSR's loader.
CHECKPOINT_ATTRIBUTE = 'oaq_spandrel_checkpoint'


def Spandrel(checkpoint: Union[str, os.PathLike], scale: Optional[int] = None) -> nn.Module:  # noqa: N802
    """The float network of a checkpoint spandrel recognises, with its weights (BasicSR builds archs by name).

    Args:
        checkpoint: The ``.pth``/``.safetensors`` file.
        scale: The expected scale; a checkpoint of another scale is refused.
    """
    model = load_sr_model(checkpoint, scale=scale)
    setattr(model.module, CHECKPOINT_ATTRIBUTE, str(Path(checkpoint).expanduser().resolve()))
    return model.module


def network_options(opt: Dict[str, Any]) -> Dict[str, Any]:
    """``opt['network_g']``, with a ``Spandrel`` arch given its checkpoint and scale from the rest of ``opt``.

    Other archs are returned unchanged.
    """
    network = dict(opt.get('network_g') or {})
    if network.get('type') != SPANDREL_ARCH:
        return network
    if not network.get('checkpoint'):
        path = (opt.get('path') or {}).get('pretrain_network_g')
        if not path:
            raise ConfigError(f'network_g type {SPANDREL_ARCH} needs the checkpoint: set path.pretrain_network_g '
                              '(or network_g.checkpoint)')
        network['checkpoint'] = path
    if opt.get('scale') is not None:
        network.setdefault('scale', int(opt['scale']))
    return network


def loaded_from(net: nn.Module, load_path: Union[str, os.PathLike]) -> bool:
    """Whether ``net`` was built here from ``load_path`` (its weights are in already)."""
    built_from = getattr(net, CHECKPOINT_ATTRIBUTE, None)
    return built_from is not None and built_from == str(Path(load_path).expanduser().resolve())
