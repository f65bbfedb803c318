"""The whole pipeline behind ``quantize``: convert -> calibrate -> search -> learned rounding -> block
reconstruction -> finetune."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..config import OAQConfig
from ..errors import DataError, OAQError
from ..quant.convert import LayerPlan, convert
from .calibrate import calibrate, model_device
from .patches import PatchSource
from .resume import STAGES, PathLike, PipelineCheckpoint, SafePoint, StopRequest, restore_quantizer_state

CalibrationData = Union[PatchSource, Iterable[torch.Tensor]]


@dataclass
class PipelineResult:
    """The quantized model and what each stage measured."""

    model: nn.Module
    config: OAQConfig
    plans: List[LayerPlan]
    timings: Dict[str, float] = field(default_factory=dict)
    search: Optional[Any] = None
    rounding: Optional[Any] = None
    reconstruction: Optional[Any] = None
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
                 finetune_source: Optional[PatchSource] = None, state_path: Optional[PathLike] = None,
                 resume: bool = False, stop: Optional[StopRequest] = None) -> PipelineResult:
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
        state_path: Makes the run interruptible (single process only): while it runs, SIGINT/SIGTERM (or
            ``stop``) stop it at the next safe point (between calibration batches, search layers,
            learned-rounding layers, reconstruction blocks, finetuning iterations) after saving its state
            to this file, and :class:`Interrupted` is raised. The file is deleted when the run completes.
        resume: Continue from the state at ``state_path`` when there is one: the result is identical to
            an uninterrupted run's. A state saved with other options (other than ``kernel``, ``tile``,
            ``analysis``), other float weights or other calibration batches is refused.
        stop: A :class:`StopRequest` to stop the run from code (with ``state_path``).
    """
    config = OAQConfig.coerce(config)
    batches, source = calibration_batches(calib, config)
    source = finetune_source or source
    device = model_device(model)
    example = example_input if example_input is not None else batches[0][:1].to(device)
    if state_path is None:
        if stop is not None or resume:
            raise OAQError('run_pipeline: stop= and resume= need a state_path= to save the state to')
        return _Run(model, batches, source, config, progress, calib_shard, None).run(example)
    if calib_shard is not None and calib_shard[1] > 1:
        raise OAQError('run_pipeline: interrupt and resume (state_path=) work in single-process runs only')
    checkpoint = PipelineCheckpoint(state_path, config, model, batches, stop)
    with checkpoint.signals():
        run = _Run(model, batches, source, config, progress, calib_shard, checkpoint)
        result = run.run(example, checkpoint.load() if resume else None)
        # A stop asked for after the last safe point: the work is done, save it rather than lose it.
        run.safe_point('done')(lambda: {})
    checkpoint.discard()
    return result


class _Run:
    """The stages of one pipeline run, resumable from a saved state at their safe points."""

    def __init__(self, model: nn.Module, batches: List[torch.Tensor], source: PatchSource, config: OAQConfig,
                 progress: bool, calib_shard: Optional[Tuple[int, int]],
                 checkpoint: Optional[PipelineCheckpoint]) -> None:
        self.model, self.batches, self.source, self.config = model, batches, source, config
        self.progress, self.calib_shard, self.checkpoint = progress, calib_shard, checkpoint
        self.timings: Dict[str, float] = {}
        self.search_report = None
        self.rounding_report = None
        self.reconstruction_report = None
        self.finetune_report = None
        self.qmodel: Optional[nn.Module] = None
        self.stage_start = time.perf_counter()

    def safe_point(self, stage: str) -> Optional[SafePoint]:
        """The callback a stage calls at its safe points (``None`` when the run is not interruptible)."""
        if self.checkpoint is None:
            return None

        def context() -> Dict[str, Any]:
            timings = dict(self.timings)
            if stage != 'done':
                key = f'{stage}_s'
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - self.stage_start
            reports = {'search': self.search_report, 'rounding': self.rounding_report,
                       'reconstruction': self.reconstruction_report, 'finetune': self.finetune_report}
            return {'timings': timings,
                    **{key: report.to_dict() if report is not None else None for key, report in reports.items()}}
        return lambda progress: self.checkpoint.check(self.qmodel, stage, progress, context)

    def _stage(self, name: str, saved: Optional[Dict[str, Any]]) -> Optional[dict]:
        """Start timing stage ``name``; ``None`` when ``saved`` is past it, else its saved progress (or {})."""
        self.stage_start = time.perf_counter()
        if saved is None:
            return {}
        at = STAGES.index(saved['stage'])
        if STAGES.index(name) < at:
            return None
        return saved['progress'] if STAGES.index(name) == at else {}

    def _finish(self, name: str) -> None:
        key = f'{name}_s'
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - self.stage_start

    def _layer_by_layer(self, stage: str, progress: dict, stage_fn: Callable[..., Any], report_type: type) -> Any:
        """Run a stage that works layer by layer or block by block (search, learned rounding, block
        reconstruction), going on from its saved report.

        Its safe points save the report so far as the stage's progress.
        """
        partial = report_type.from_dict(progress['report']) if progress else None
        point = self.safe_point(stage)
        return stage_fn(self.qmodel, self.batches, self.config, progress=self.progress, done=partial,
                        safe_point=None if point is None else (lambda report: point(lambda: {'report': report()})))

    def run(self, example: torch.Tensor, saved: Optional[Dict[str, Any]] = None) -> PipelineResult:
        config, batches = self.config, self.batches
        start = time.perf_counter()
        self.qmodel = qmodel = convert(self.model, config, example)
        if saved is not None:
            restore_quantizer_state(qmodel, saved)
            self.timings.update(saved['timings'])
            if saved.get('search') is not None:
                from .search import SearchReport
                self.search_report = SearchReport.from_dict(saved['search'])
            if saved.get('rounding') is not None:
                from .learned_rounding import RoundingReport
                self.rounding_report = RoundingReport.from_dict(saved['rounding'])
            if saved.get('reconstruction') is not None:
                from .block_reconstruction import ReconstructionReport
                self.reconstruction_report = ReconstructionReport.from_dict(saved['reconstruction'])
            if saved.get('finetune') is not None:
                from .finetune import FinetuneReport
                self.finetune_report = FinetuneReport.from_dict(saved['finetune'])
            torch.set_rng_state(saved['rng'])
        convert_seconds = time.perf_counter() - start

        progress = self._stage('calibrate', saved)
        if progress is not None:
            self.stage_start -= convert_seconds
            rank, world = self.calib_shard or (0, 1)
            done = progress.get('batches_done', 0)
            mine = list(range(rank, len(batches), world))[done:]
            point = self.safe_point('calibrate')
            calibrate(qmodel, [batches[i] for i in mine], config, indices=mine, progress=self.progress,
                      safe_point=None if point is None else
                      (lambda observed: point(lambda: {'batches_done': done + observed()['batches_observed']})))
            self._finish('calibrate')

        progress = self._stage('search', saved)
        if progress is not None:
            if config.search.enabled:
                from .search import SearchReport, search
                self.search_report = self._layer_by_layer('search', progress, search, SearchReport)
            self._finish('search')

        progress = self._stage('rounding', saved)
        if progress is not None:
            if config.rounding.enabled:
                from .learned_rounding import RoundingReport, learn_rounding
                self.rounding_report = self._layer_by_layer('rounding', progress, learn_rounding, RoundingReport)
            self._finish('rounding')

        progress = self._stage('reconstruction', saved)
        if progress is not None:
            if config.reconstruction.enabled:
                from .block_reconstruction import ReconstructionReport, reconstruct_blocks
                self.reconstruction_report = self._layer_by_layer('reconstruction', progress, reconstruct_blocks,
                                                                  ReconstructionReport)
            self._finish('reconstruction')

        progress = self._stage('finetune', saved)
        if progress is not None:
            if config.finetune.enabled:
                from .finetune import finetune
                self.finetune_report = finetune(self.model, qmodel, self.source, config, progress=self.progress,
                                                safe_point=self.safe_point('finetune'), resume=progress or None)
            self._finish('finetune')

        qmodel.eval()
        for key in ('calibrate_s', 'search_s', 'rounding_s', 'reconstruction_s', 'finetune_s'):
            self.timings.setdefault(key, 0.0)
        return PipelineResult(model=qmodel, config=config, plans=list(qmodel.oaq_plans), timings=self.timings,
                              search=self.search_report, rounding=self.rounding_report,
                              reconstruction=self.reconstruction_report,
                              finetune=self.finetune_report)


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
