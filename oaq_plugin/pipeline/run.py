"""The whole pipeline behind ``quantize``: convert -> calibrate -> search -> finetune."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..config import OAQConfig
from ..errors import DataError
from ..quant.convert import LayerPlan, convert
from .calibrate import calibrate, model_device
from .patches import PatchSource

CalibrationData = Union[PatchSource, Iterable[torch.Tensor]]


@dataclass
class PipelineResult:
    """The quantized model and what each stage measured."""

    model: nn.Module
    config: OAQConfig
    plans: List[LayerPlan]
    timings: Dict[str, float] = field(default_factory=dict)
    search: Optional[Any] = None
    finetune: Optional[Any] = None


def calibration_batches(calib: CalibrationData, config: OAQConfig) -> tuple:
    """``(batches, source)``: fixed calibration batches and the pool finetuning crops from."""
    if isinstance(calib, PatchSource):
        c = config.calib
        return calib.batches(c.num_batches, c.batch_size, c.patch_size, c.seed), calib
    if isinstance(calib, torch.Tensor):
        calib = [calib]
    batches = list(calib)
    for i, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise DataError(f'calibration batch {i} must be a tensor of shape (N, C, H, W), got {shape}')
    if not batches:
        raise DataError('no calibration batch given: pass at least one (N, C, H, W) tensor of LR inputs')
    return batches, PatchSource.from_batches(batches)


def run_pipeline(model: nn.Module, calib: CalibrationData, config: Union[OAQConfig, dict, None] = None,
                 progress: bool = False, example_input: Optional[torch.Tensor] = None,
                 calib_shard: Optional[Tuple[int, int]] = None,
                 finetune_source: Optional[PatchSource] = None) -> PipelineResult:
    """Quantize a copy of ``model`` and return it with the per-stage reports.

    Args:
        model: The float network (left untouched).
        calib: LR batches (N, C, H, W) in the model's input range, or a :class:`PatchSource`.
        config: An :class:`OAQConfig` or its dict form (defaults when ``None``).
        progress: Show progress bars.
        example_input: Input used to detect layer roles (default: one calibration sample).
        calib_shard: ``(rank, world_size)`` under ``torch.distributed``: this process observes the batches
            ``rank, rank + world_size, ...`` and the statistics are merged across processes; the search
            and finetuning then run on the same data in every process, so all end with the same model.
        finetune_source: Pool finetuning crops from (default: the calibration data).
    """
    config = OAQConfig.coerce(config)
    batches, source = calibration_batches(calib, config)
    source = finetune_source or source
    device = model_device(model)
    example = example_input if example_input is not None else batches[0][:1].to(device)
    timings: Dict[str, float] = {}

    start = time.perf_counter()
    qmodel = convert(model, config, example)
    rank, world = calib_shard or (0, 1)
    mine = list(range(rank, len(batches), world))
    calibrate(qmodel, [batches[i] for i in mine], config, indices=mine, progress=progress)
    timings['calibrate_s'] = time.perf_counter() - start

    search_report = None
    start = time.perf_counter()
    if config.search.enabled:
        from .search import search
        search_report = search(qmodel, batches, config, progress=progress)
    timings['search_s'] = time.perf_counter() - start

    finetune_report = None
    start = time.perf_counter()
    if config.finetune.enabled:
        from .finetune import finetune
        finetune_report = finetune(model, qmodel, source, config, progress=progress)
    timings['finetune_s'] = time.perf_counter() - start

    qmodel.eval()
    return PipelineResult(model=qmodel, config=config, plans=list(qmodel.oaq_plans), timings=timings,
                          search=search_report, finetune=finetune_report)


def quantize(model: nn.Module, calib_batches: CalibrationData, config: Union[OAQConfig, dict, None] = None,
             progress: bool = False) -> nn.Module:
    """Quantize a copy of ``model``: the library's one entry point.

    Args:
        model: The float SR network; it is not modified.
        calib_batches: Any iterable of LR tensors (N, C, H, W) in the model's input range.
        config: An :class:`OAQConfig` (or the dict of an ``oaq:`` option section).
        progress: Show progress bars.

    Returns:
        A new module whose Conv2d/ConvTranspose2d/Linear layers are quantized wrappers.
    """
    return run_pipeline(model, calib_batches, config, progress=progress).model
