"""Networks by BasicSR registry name: the zoo's architectures registered in BasicSR's ``ARCH_REGISTRY``.

BasicSR is imported only when a network is built, so every adapter (and the CLI) can build a
``network_g`` section without depending on the BasicSR adapter.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..compat import install_basicsr_compat

_registered = False


def register_once(registry: Any, obj: Any) -> None:
    """Register ``obj`` under its name unless the name is taken (BasicSR's registry asserts on duplicates)."""
    if obj.__name__ not in registry:
        registry.register(obj)


def register_archs() -> None:
    """Put the zoo's architectures into BasicSR's ``ARCH_REGISTRY`` (idempotent)."""
    global _registered
    if _registered:
        return
    install_basicsr_compat()
    from basicsr.utils.registry import ARCH_REGISTRY

    from . import ZOO_ARCHS
    for arch in ZOO_ARCHS.values():
        register_once(ARCH_REGISTRY, arch)
    _registered = True


def build_arch(network_opt: Mapping[str, Any]) -> nn.Module:
    """A float network from a BasicSR ``network_g`` dict (``type`` plus constructor arguments)."""
    register_archs()
    from basicsr.archs import build_network
    return build_network(dict(network_opt))
