"""Outlier-aware post-training quantization for super-resolution networks.

``quantize(model, calib_batches, OAQConfig(...))`` is the one entry point; the BasicSR and mmengine
adapters are thin layers over it and are imported only when used.
"""
from .config import OAQConfig
from .errors import ConfigError, DataError, NumericalError, OAQError, UnsupportedLayerError
from .pipeline.run import PipelineResult, quantize, run_pipeline

__version__ = '0.1.0'

__all__ = [
    'ConfigError', 'DataError', 'NumericalError', 'OAQConfig', 'OAQError', 'PipelineResult', 'UnsupportedLayerError',
    'quantize', 'run_pipeline', 'register',
]


def register() -> None:
    """Register the plugin's models, metrics and archs in BasicSR's registries (idempotent)."""
    from .basicsr_plugin.registration import register as register_basicsr
    register_basicsr()
