"""The quantization core: quantizers, quantized layers and model conversion (depends on torch only)."""
from .activation import ActivationQuantizer
from .attention import QuantMatmul, QuantWindowAttention, matmul_quantizers, quant_matmuls
from .convert import LayerPlan, convert, detect_roles, plan_layers, quantized_modules, set_mode
from .dual_region import DualRegionQuantizer, level_counts
from .layers import QuantConv2d, QuantConvTranspose2d, QuantLayer, QuantLinear, quant_layers
from .observer import ActivationObserver, ObservedStats, histogram_quantile
from .region_grid import Region, RegionGrid
from .uniform import UniformQuantizer
from .weight import WeightQuantizer

__all__ = [
    'ActivationObserver', 'ActivationQuantizer', 'DualRegionQuantizer', 'LayerPlan', 'ObservedStats',
    'QuantConv2d', 'QuantConvTranspose2d', 'QuantLayer', 'QuantLinear', 'QuantMatmul', 'QuantWindowAttention',
    'Region', 'RegionGrid', 'UniformQuantizer', 'WeightQuantizer', 'convert', 'detect_roles', 'histogram_quantile',
    'level_counts', 'matmul_quantizers', 'plan_layers', 'quant_layers', 'quant_matmuls', 'quantized_modules',
    'set_mode',
]
