"""The ``oaq_report.json`` of a run: config, per-layer parameters, per-dataset metrics, timings, memory."""
from __future__ import annotations

import dataclasses
import json
import resource
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ...quant.attention import matmul_quantizers
from ...quant.dual_region import DualRegionQuantizer
from ...quant.layers import quant_layers
from ..run import PipelineResult
from .export import write_atomically


def _activation_fields(act) -> Dict[str, Any]:
    sample = act.observer.sample()
    return {
        'a_bits': act.bits,
        'quantizer': type(act).__name__,
        'lower': float(act.lower.detach()),
        'upper': float(act.upper.detach()),
        'breakpoint': float(act.breakpoint.detach()) if isinstance(act, DualRegionQuantizer) else None,
        'outlier_fraction': act.outlier_fraction(sample) if sample.numel() else None,
        'mean_std': act.observed.mean_std if act.observed is not None else None,
    }


def layer_rows(qmodel: nn.Module) -> List[Dict[str, Any]]:
    """One row per quantized layer: bits, activation range, breakpoint, weight clip, outlier fraction.

    Then one row per operand of a quantized attention matmul (``kind: matmul``, named e.g.
    ``...attn.matmul_qk.q``), with no weight; those always run as fake quantization.
    """
    rows = []
    for name, layer in quant_layers(qmodel):
        clip = layer.weight_quantizer.clip.detach().reshape(-1)
        rows.append({
            'name': name,
            'kind': type(layer.module).__name__,
            'role': layer.role,
            'w_bits': layer.weight_quantizer.bits,
            **_activation_fields(layer.act_quantizer),
            'w_clip': float(clip.mean()) if clip.numel() > 1 else float(clip),
            'w_clip_max': float(clip.max()),
            'backend': layer.executor_name,
        })
    for name, matmul, act in matmul_quantizers(qmodel):
        rows.append({'name': name, 'kind': 'matmul', 'role': matmul.role, 'w_bits': None, **_activation_fields(act),
                     'w_clip': None, 'w_clip_max': None, 'backend': matmul.executor_name})
    return rows


def peak_memory() -> Dict[str, Optional[float]]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory (MiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / (1024 * 1024) if sys.platform == 'darwin' else rss / 1024
    cuda = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
    return {'cpu_peak_rss_mib': round(rss_mib, 1), 'cuda_peak_allocated_mib': None if cuda is None else round(cuda, 1)}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a report."""
    text = json.dumps(data, indent=2, default=_json_default)
    write_atomically(path, lambda stream: stream.write(text.encode()))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, 'to_dict'):
        return value.to_dict()
    return str(value)


def conversion_fields(result: PipelineResult) -> Dict[str, Any]:
    """What the conversion did beside the layer rows: the multiply-adds at each bit width
    (``macs_by_bits``, with ``total_macs`` on ``macs_input_shape``), every op left in float with its share
    (``float_ops``), the batch norms folded into convs (``batchnorm_folds``, conv: batch norm), the conv pairs
    channel equalization scaled (``equalized``), and the end-to-end check (``check``)."""
    accounting = getattr(result.model, 'oaq_op_accounting', None)
    counts = accounting.to_dict() if accounting is not None else {}
    return {
        'macs_by_bits': counts.get('macs_by_bits'),
        'total_macs': counts.get('total_macs'),
        'macs_input_shape': counts.get('input_shape'),
        'float_ops': counts.get('float_ops'),
        'batchnorm_folds': {plan.name: plan.folded_batchnorm for plan in result.plans if plan.folded_batchnorm},
        'equalized': [dataclasses.asdict(pair) for pair in result.equalized],
        'check': result.check.to_dict() if result.check is not None else None,
    }


class RunReport:
    """Accumulates what a run measured and rewrites ``oaq_report.json`` after every change."""

    def __init__(self, path: Path, result: PipelineResult, extra: Optional[Dict[str, Any]] = None) -> None:
        self.path = Path(path)
        self.data: Dict[str, Any] = {
            'config': result.config.to_dict(),
            'layers': layer_rows(result.model),
            'datasets': {},
            'timings': {**{k: round(v, 3) for k, v in result.timings.items()}, 'validate_s': 0.0},
            **result.report_dicts(),
            **conversion_fields(result),
            **(extra or {}),
        }

    def add_dataset(self, name: str, metrics: Dict[str, Any], validate_s: float) -> None:
        self.data['datasets'][name] = metrics
        self.data['timings']['validate_s'] = round(self.data['timings']['validate_s'] + validate_s, 3)
        self.write()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def write(self) -> None:
        """Rewrite ``oaq_report.json`` and, beside it, ``report.html`` (the page a person reads)."""
        from .html_report import REPORT_HTML, write_html_report
        self.data['peak_memory'] = peak_memory()
        write_json_atomic(self.path, self.data)
        write_html_report(self.path.parent, self.data, self.path.with_name(REPORT_HTML))
