"""The whole pipeline behind ``quantize``: convert, then the stages of :data:`STAGES` in order, resumable
at their safe points."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..config import OAQConfig
from ..errors import ConfigError, DataError, OAQError
from ..quant.convert import LayerPlan, convert
from ..quant.equalization import EqualizedPair, equalize
from .analysis.end_to_end_check import EndToEndCheck, end_to_end_check
from .io.patches import PatchSource
from .resume import DONE, PathLike, PipelineCheckpoint, SafePoint, StopRequest, restore_quantizer_state
from .stages.base import Stage, StageContext, StageReport, no_safe_point
from .stages.block_reconstruction import ReconstructionStage
from .stages.calibrate import CalibrateStage, model_device
from .stages.distillation import DistillationStage
from .stages.finetune import FinetuneStage
from .stages.learned_rounding import RoundingStage
from .stages.search import SearchStage

# The stages in the order they run: the one list a new stage is added to.
STAGES: Tuple[Stage, ...] = (CalibrateStage(), SearchStage(), RoundingStage(), ReconstructionStage(),
                             DistillationStage(), FinetuneStage())

logger = logging.getLogger('oaq_plugin')

CalibrationData = Union[PatchSource, Iterable[torch.Tensor]]


def stage_names() -> List[str]:
    """The names of the stages, in the order they run (timings are ``<name>_s``)."""
    return [stage.name for stage in STAGES]


@dataclass
class PipelineResult:
    """The quantized model and what each stage measured.

    Attributes:
        timings: Seconds per stage, ``<name>_s`` for each of :data:`STAGES` (conversion counts as calibration).
        reports: The report of each stage that ran and makes one, by stage name.
        check: The end-to-end check of the quantized network on held-back calibration crops.
        equalized: The conv pairs channel equalization scaled (empty when it is off or found none).
    """

    model: nn.Module
    config: OAQConfig
    plans: List[LayerPlan]
    timings: Dict[str, float] = field(default_factory=dict)
    reports: Dict[str, StageReport] = field(default_factory=dict)
    check: Optional[EndToEndCheck] = None
    equalized: List[EqualizedPair] = field(default_factory=list)

    def report_dicts(self) -> Dict[str, Optional[Dict[str, Any]]]:
        """Every reporting stage's report as a dict, by stage name (``None`` for one that did not run)."""
        return {stage.name: self.reports[stage.name].to_dict() if stage.name in self.reports else None
                for stage in STAGES if stage.report_type is not None}


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
            an uninterrupted run's. A state saved with another method config, other float weights or other
            calibration batches is refused.
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
        return _Runner(model, batches, source, config, progress, calib_shard, None).run(example)
    if calib_shard is not None and calib_shard[1] > 1:
        raise OAQError('run_pipeline: interrupt and resume (state_path=) work in single-process runs only')
    checkpoint = PipelineCheckpoint(state_path, config, model, batches, stop)
    with checkpoint.signals():
        runner = _Runner(model, batches, source, config, progress, calib_shard, checkpoint)
        result = runner.run(example, checkpoint.load() if resume else None)
        # A stop asked for after the last safe point: the work is done, save it rather than lose it.
        runner.safe_point(DONE)(dict)
    checkpoint.discard()
    return result


class _Runner:
    """One pipeline run: the stages of :data:`STAGES` in order, each timed, resumable at its safe points
    from a state saved there."""

    def __init__(self, model: nn.Module, batches: List[torch.Tensor], source: PatchSource, config: OAQConfig,
                 progress: bool, calib_shard: Optional[Tuple[int, int]],
                 checkpoint: Optional[PipelineCheckpoint]) -> None:
        self.model, self.batches, self.source, self.config = model, batches, source, config
        self.progress, self.calib_shard, self.checkpoint = progress, calib_shard, checkpoint
        self.timings: Dict[str, float] = {}
        self.reports: Dict[str, StageReport] = {}
        self.qmodel: Optional[nn.Module] = None
        self.equalized: List[EqualizedPair] = []
        self.stage_start = time.perf_counter()

    def safe_point(self, stage: str) -> SafePoint:
        """The safe point of stage ``stage``: saves the run there when a stop was asked for."""
        if self.checkpoint is None:
            return no_safe_point

        def pipeline_state() -> Dict[str, Any]:
            timings = dict(self.timings)
            if stage != DONE:
                key = f'{stage}_s'
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - self.stage_start
            return {'timings': timings, 'reports': {name: report.to_dict() for name, report in self.reports.items()}}
        return lambda snapshot: self.checkpoint.check(self.qmodel, stage, snapshot, pipeline_state)

    def _restore(self, saved: Dict[str, Any]) -> None:
        """Put the model, timings, reports and random state of a saved run back."""
        restore_quantizer_state(self.qmodel, saved)
        self.timings.update(saved['timings'])
        stages = {stage.name: stage for stage in STAGES}
        self.reports = {name: stages[name].report_type.from_dict(data) for name, data in saved['reports'].items()}
        torch.set_rng_state(saved['rng'])

    def run(self, example: torch.Tensor, saved: Optional[Dict[str, Any]] = None) -> PipelineResult:
        start = time.perf_counter()
        self.qmodel = convert(self._equalized_model(example), self.config, example)
        if saved is not None:
            self._restore(saved)
        convert_seconds = time.perf_counter() - start
        # Stages before the saved one are done (their results are in the restored state); the saved one
        # goes on from its own saved state.
        at = ([stage.name for stage in STAGES] + [DONE]).index(saved['stage']) if saved is not None else 0
        for index, stage in enumerate(STAGES):
            if index < at:
                continue
            self.stage_start = time.perf_counter() - (convert_seconds if index == 0 else 0.0)
            if stage.enabled(self.config):
                context = StageContext(qmodel=self.qmodel, batches=self.batches, config=self.config,
                                       float_model=self.model, source=self.source, progress=self.progress,
                                       saved=saved['progress'] if saved is not None and index == at else None,
                                       safe_point=self.safe_point(stage.name), calib_shard=self.calib_shard)
                report = stage.run(context)
                if report is not None:
                    self.reports[stage.name] = report
            key = f'{stage.name}_s'
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - self.stage_start
        self.qmodel.eval()
        for stage in STAGES:
            self.timings.setdefault(f'{stage.name}_s', 0.0)
        check = end_to_end_check(self.model, self.qmodel, self.source, self.config)
        return PipelineResult(model=self.qmodel, config=self.config, plans=list(self.qmodel.oaq_plans),
                              timings=self.timings, reports=dict(self.reports), check=check,
                              equalized=list(self.equalized))

    def _equalized_model(self, example: torch.Tensor) -> nn.Module:
        """The float network to convert: a channel-equalized copy when equalization is on (the same function;
        the float network itself stays the teacher and reference), otherwise the network itself. A resumed
        run recomputes the same copy from the same batches."""
        settings = self.config.equalization
        if not settings.enabled:
            return self.model
        model = copy.deepcopy(self.model)
        self.equalized = equalize(model, self.batches, example, settings.strength)
        logger.info('equalization: %d conv pairs scaled (%d channels)', len(self.equalized),
                    sum(pair.channels for pair in self.equalized))
        return model


def quantize(model: nn.Module, calib_batches: CalibrationData, config: Union[OAQConfig, dict, None] = None,
             progress: bool = True) -> nn.Module:
    """Quantize a copy of ``model``: the library's one entry point.

    Args:
        model: The float SR network; it is not modified.
        calib_batches: Any iterable of LR tensors (N, C, H, W) in the model's input range, used as they are;
            or a :class:`PatchSource`, from which ``calib.num_batches`` batches of ``calib.batch_size``
            patches of ``calib.patch_size`` are cut (seed ``calib.seed``).
        config: An :class:`OAQConfig` (or a dict of the method's keys of an ``oaq:`` section; the run's keys,
            such as ``backend`` or ``tile``, are refused: they belong to a run, see ``run_experiment``).
        progress: Show progress bars on stderr (``False`` silences them).

    Returns:
        A new module whose Conv2d/ConvTranspose2d/Linear layers are quantized wrappers.

    Raises:
        ConfigError: A bad option, or ``calib.dataroot_lq`` (a folder ``quantize`` would not read: it
            calibrates on ``calib_batches``).
    """
    config = OAQConfig.coerce(config)
    if config.calib.dataroot_lq:
        raise ConfigError(f'quantize() calibrates on the calib_batches it is given, so it does not read '
                          f'oaq.calib.dataroot_lq ({config.calib.dataroot_lq!r}); leave it unset, or give the folder '
                          'to run_experiment or an adapter, which read it')
    return run_pipeline(model, calib_batches, config, progress=progress).model
