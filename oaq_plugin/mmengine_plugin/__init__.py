"""mmengine adapter: ``OAQHook`` and the pieces a config needs to test an SR network with it.

Import it from a config with ``custom_imports=dict(imports=['oaq_plugin.mmengine_plugin'],
allow_failed_imports=False)``; this registers ``OAQHook`` (HOOKS), ``SuperResolutionModel`` and
``SRDataPreprocessor`` (MODELS), ``PairedImageDataset`` (DATASETS), ``PSNRMetric`` and ``SSIMMetric``
(METRICS) in mmengine's registries, and makes mmengine load local checkpoints weights-only with the
types its own checkpoints hold (see :mod:`oaq_plugin.mmengine_plugin.checkpoint`). ``import oaq_plugin``
alone never imports mmengine.
"""
from .checkpoint import load_checkpoint_file, register_checkpoint_loader
from .data_preprocessor import SRDataPreprocessor
from .hook import OAQHook
from .metrics import PSNRMetric, SSIMMetric
from .paired_image_dataset import PairedImageDataset
from .sr_model import SuperResolutionModel, build_generator

register_checkpoint_loader()

__all__ = [
    'OAQHook', 'PSNRMetric', 'PairedImageDataset', 'SRDataPreprocessor', 'SSIMMetric', 'SuperResolutionModel',
    'build_generator', 'load_checkpoint_file', 'register_checkpoint_loader',
]
