"""Outlier-aware post-training quantization for super-resolution networks.

``quantize(model, calib_batches, OAQConfig(...))`` is the one entry point; the BasicSR and mmengine
adapters are thin layers over it and are imported only when used.
"""
from .config import OAQConfig
from .errors import ConfigError, DataError, Interrupted, NumericalError, OAQError, UnsupportedLayerError
from .pipeline.run import PipelineResult, quantize, run_pipeline

__version__ = '0.1.0'

__all__ = [
    'ConfigError', 'DataError', 'Interrupted', 'NumericalError', 'OAQConfig', 'OAQError', 'PipelineResult',
    'UnsupportedLayerError',
    'quantize', 'run_pipeline', 'register', 'load_quantized', 'to_backend',
]


def load_quantized(path, model=None):
    """Restore a ``quantized.pth`` written by a run (bit-exact).

    Args:
        path: The file.
        model: A float skeleton of the same architecture; by default it is built from the file's
            stored ``network_g`` through BasicSR's ARCH_REGISTRY (the plugin's archs included).
    """
    from .pipeline.export import load_quantized as load
    if model is not None:
        return load(path, model=model)
    from .basicsr_plugin.registration import build_arch
    return load(path, builder=build_arch)


def __getattr__(name: str):
    # ``oaq_register: !!python/name:oaq_plugin.register`` in an option file makes BasicSR's YAML loader
    # look this attribute up while parsing: looking it up registers the plugin, so that plain
    # ``basicsr/test.py`` finds OAQModel. Kept lazy so that the core imports without basicsr.
    if name == 'register':
        from .basicsr_plugin.registration import register
        register()
        return register
    if name == 'to_backend':
        from .backends.select import to_backend
        return to_backend
    raise AttributeError(f"module 'oaq_plugin' has no attribute {name!r}")
