"""Registration of the plugin's models, archs and metrics in BasicSR's registries (idempotent)."""
from __future__ import annotations

from ..compat import install_basicsr_compat

_registered = False


def _register_once(registry, obj) -> None:
    # BasicSR's registry asserts on duplicate names: a second import or call must be harmless.
    if obj.__name__ not in registry:
        registry.register(obj)


def register() -> None:
    """Make ``model_type: OAQModel``, the zoo archs and the OAQ metrics usable from BasicSR option files."""
    global _registered
    if _registered:
        return
    install_basicsr_compat()
    from basicsr.utils.registry import ARCH_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

    from ..archs import ZOO_ARCHS
    from . import metrics
    from .oaq_model import OAQModel, OAQSwinIRModel

    for model_class in (OAQModel, OAQSwinIRModel):
        _register_once(MODEL_REGISTRY, model_class)
    for arch in ZOO_ARCHS.values():
        _register_once(ARCH_REGISTRY, arch)
    for metric in (metrics.calculate_delta_e, metrics.calculate_fidelity_psnr):
        _register_once(METRIC_REGISTRY, metric)
    _registered = True


def build_arch(network_opt: dict):
    """A float network from a BasicSR ``network_g`` dict (``type`` plus constructor arguments)."""
    register()
    from basicsr.archs import build_network
    return build_network(dict(network_opt))
