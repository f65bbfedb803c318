"""Outlier-aware post-training quantization for super-resolution networks.

``quantize(model, calib_batches, OAQConfig(...))`` is the one entry point of the method;
``run_experiment`` is the whole run (quantize, validate, write the artifacts) that the BasicSR and mmengine
adapters and the ``oaq`` CLI share. Adapters are imported only when used.
"""
from .config import OAQConfig, OAQOptions, RunOptions
from .errors import ConfigError, DataError, Interrupted, NumericalError, OAQError, UnsupportedLayerError

__version__ = '0.1.0'

__all__ = [
    'ConfigError', 'DataError', 'Interrupted', 'NumericalError', 'OAQConfig', 'OAQError', 'OAQOptions',
    'PipelineResult', 'RunOptions', 'UnsupportedLayerError',
    'SRModel', 'quantize', 'run_experiment', 'run_pipeline', 'register', 'load_quantized', 'load_sr_model',
    'to_backend', 'export_onnx',
]

# Names imported on first use (PEP 562), so that ``import oaq_plugin`` (and a CLI's ``--help``) does not
# import torch: ``{name: module}``.
_LAZY = {
    'PipelineResult': '.pipeline.run', 'quantize': '.pipeline.run', 'run_pipeline': '.pipeline.run',
    'SRModel': '.loading', 'load_sr_model': '.loading', 'run_experiment': '.experiment',
    'to_backend': '.backends.select', 'export_onnx': '.pipeline.io.onnx_export',
}


def load_quantized(path, model=None):
    """Restore a ``quantized.pth`` written by a run (bit-exact).

    Args:
        path: The file.
        model: A float skeleton of the same architecture; by default it is built from the file's
            stored ``network_g`` through BasicSR's ARCH_REGISTRY (the plugin's archs included).
    """
    from .pipeline.io.export import load_quantized as load
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
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'oaq_plugin' has no attribute {name!r}")
