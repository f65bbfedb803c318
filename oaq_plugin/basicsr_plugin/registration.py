"""Registration of the plugin's models, archs and metrics in BasicSR's registries (idempotent)."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..archs.registry import build_arch as _build_arch
from ..archs.registry import register_archs, register_once
from ..compat import install_basicsr_compat

_registered = False


def register() -> None:
    """Make ``model_type: OAQModel``, the zoo archs, ``Spandrel`` and the OAQ metrics usable from option files."""
    global _registered
    if _registered:
        return
    install_basicsr_compat()
    from basicsr.utils.registry import ARCH_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

    from . import metrics
    from .oaq_model import OAQModel, OAQSwinIRModel
    from .spandrel_arch import Spandrel

    register_archs()
    for model_class in (OAQModel, OAQSwinIRModel):
        register_once(MODEL_REGISTRY, model_class)
    register_once(ARCH_REGISTRY, Spandrel)
    for metric in (metrics.calculate_delta_e, metrics.calculate_fidelity_psnr):
        register_once(METRIC_REGISTRY, metric)
    _registered = True


def build_arch(network_opt: Mapping[str, Any]) -> nn.Module:
    """A float network from a BasicSR ``network_g`` dict (``type`` plus constructor arguments), ``Spandrel``
    included."""
    register()
    return _build_arch(network_opt)
