"""One quantization run, shared by the BasicSR and mmengine adapters and the ``oaq`` CLI.

Calibration pool -> device batches -> the pipeline (resumable) -> the validation backend -> the artifacts
(``quantized.pth``, histograms, ``oaq_report.json``, analyses), then per image the fidelity PSNR and
Delta E of the quantized against the float output, the crop figures, and per test set the means and the
summary table. The adapters bring only what their framework owns: where the network and the images
come from, and (BasicSR, mmengine) the test loop and its metrics. :func:`run_experiment` is the whole run
for a caller without a test loop of its own.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..backends.select import backend_summary, to_backend
from ..config import OAQConfig, OAQOptions, RunOptions
from ..errors import ConfigError, DataError
from ..pipeline.inference import run_tiled
from ..pipeline.io.export import float_size_bytes, quantized_size_bytes, save_quantized
from ..pipeline.io.figures import activation_histograms
from ..pipeline.io.images import read_image
from ..pipeline.io.patches import PatchSource
from ..pipeline.io.report import RunReport
from ..pipeline.metrics.image_quality import psnr, ssim, tensor_to_uint8
from ..pipeline.run import PipelineResult, run_pipeline
from ..pipeline.stages.calibrate import model_device
from .artifacts import (HISTOGRAM_FILE, ONNX_FILE, QUANTIZED_FILE, REPORT_FILE, SENSITIVITY_FILE, archive_existing,
                        crop_path, run_note, write_run_note)
from .calibration_data import warn_if_calibrating_on_test_sets
from .validation import PROTOCOL_NOTE, DatasetTally, compare_outputs, summary_table, write_crop

PathLike = Union[str, os.PathLike]
# The metrics run_experiment measures against the ground truth (Y channel, crop = scale).
TEST_METRICS = ('psnr', 'ssim')


@dataclass
class TestSet:
    """A test set: its LR images, each with its HR ground truth (or ``None``: fidelity to the float output only).

    Args:
        name: The name the report and the crops use.
        lr_dir: The LR folder, for the report.
        hr_dir: The HR folder, for the report.
        pairs: ``(LR file, HR file or None)`` per image.
    """

    __test__ = False  # a name pytest would otherwise collect as a test class

    name: str
    lr_dir: Optional[Path] = None
    hr_dir: Optional[Path] = None
    pairs: List[Tuple[Path, Optional[Path]]] = field(default_factory=list)

    def files(self) -> List[Path]:
        """Every image file of the set (LR and HR)."""
        return [path for pair in self.pairs for path in pair if path is not None]

    def check(self) -> None:
        """Refuse an empty set or a missing image (before anything is written)."""
        if not self.pairs:
            raise DataError(f"test set '{self.name}' holds no image")
        for path in self.files():
            if not Path(path).is_file():
                raise DataError(f"test set '{self.name}': image {path} does not exist")


@dataclass
class ExperimentResult:
    """What one run produced.

    Attributes:
        model: The quantized network, on the chosen backend.
        pipeline: The pipeline's result (plans, timings, stage reports).
        report: The contents of ``oaq_report.json``.
        out_dir: The results folder.
    """

    model: nn.Module
    pipeline: PipelineResult
    report: Dict[str, Any]
    out_dir: Path

    @property
    def report_path(self) -> Path:
        return self.out_dir / REPORT_FILE


class Experiment:
    """One run in steps, for adapters whose framework owns the test loop (BasicSR, mmengine).

    ``start`` writes ``run.txt``; ``quantize`` runs the pipeline and writes the artifacts; then, per test
    set, ``start_dataset``, ``compare`` for each image and ``finish_dataset``. Every process of a
    distributed run makes one; the main process (rank 0) writes the files other than the crops (each
    process writes the crops of its images).

    Args:
        options: The ``oaq:`` section (:class:`OAQOptions`, a mapping, or an :class:`OAQConfig`).
        out_dir: The results folder.
        logger: Where progress lines go (default: the ``oaq_plugin`` logger).
        name: The run's name (in the report and ``run.txt``).
        scale: The network's scale (the border crop of every metric).
        window: Inputs are padded to a multiple of this at validation (SwinIR's window size).
        progress: Show progress bars (the main process only).
        rank: This process's rank.
        world_size: The number of processes.
        state_path: Where an interrupted run saves its state (``None``: not interruptible); single process only.
        resume: Also continue from a saved state when ``oaq.resume`` is off (BasicSR's ``--auto_resume``).
        preset: The CLI preset, for ``run.txt`` and the report.
    """

    def __init__(self, options: Union[OAQOptions, OAQConfig, Mapping[str, Any], None], out_dir: PathLike,
                 logger: Optional[logging.Logger] = None, *, name: Optional[str] = None, scale: int = 1,
                 window: int = 1, progress: bool = True, rank: int = 0, world_size: int = 1,
                 state_path: Optional[PathLike] = None, resume: bool = False, preset: Optional[str] = None) -> None:
        self.options = OAQOptions.coerce(options)
        self.out_dir = Path(out_dir)
        self.logger = logger or logging.getLogger('oaq_plugin')
        self.name = name if name is not None else self.out_dir.name
        self.scale, self.window = int(scale), int(window)
        self.rank, self.world_size = rank, world_size
        self.progress = progress and rank == 0
        self.state_path = Path(state_path) if state_path is not None else None
        self.resume = resume
        self.preset = preset
        self.fp_net: Optional[nn.Module] = None
        self.quant_net: Optional[nn.Module] = None
        self.calibration: Optional[PatchSource] = None
        self.pipeline: Optional[PipelineResult] = None
        self.report: Optional[RunReport] = None

    @property
    def method(self) -> OAQConfig:
        return self.options.method

    @property
    def run(self) -> RunOptions:
        return self.options.run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the run -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Write ``run.txt`` into the results folder (made when missing): which variant this folder holds."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_run_note(self.out_dir, run_note(self.options, self.name, self.preset))

    def warn_about_test_sets(self, test_sets: Mapping[str, Sequence[PathLike]]) -> Dict[str, int]:
        """Warn, naming the set, when calibration images (``oaq.calib.dataroot_lq``) are in a test set."""
        if not self.is_main or not self.method.calib.dataroot_lq:
            return {}
        return warn_if_calibrating_on_test_sets(self.method.calib, test_sets, self.logger)

    def quantize(self, model: nn.Module, calibration: PatchSource, origin: str, *,
                 arch: Optional[Mapping[str, Any]] = None, report_extra: Optional[Mapping[str, Any]] = None,
                 save_model: bool = True, label: str = '') -> nn.Module:
        """Calibrate on ``calibration``, run the pipeline on a copy of ``model``, put it on the backend and
        write the artifacts. Returns the quantized network (on ``model``'s device).

        Args:
            model: The float network (left untouched), in eval mode.
            calibration: The pool calibration patches and finetuning crops are cut from.
            origin: Where the pool came from, for the log line and the report.
            arch: How to rebuild the float skeleton (a BasicSR ``network_g``), stored in ``quantized.pth``.
            report_extra: More entries of ``oaq_report.json`` (the network, its checkpoint, ...).
            save_model: Write ``quantized.pth`` and the histograms.
            label: Said after the network's class name in the log line (e.g. its attribute).
        """
        c = self.method.calib
        batches = calibration.batches(c.num_batches, c.batch_size, c.patch_size, c.seed)
        device = model_device(model)
        m = self.method
        self.logger.info(f'OAQ: calibrating {type(model).__name__}{label} on {len(calibration)} images of {origin} '
                         f'({len(batches)} batches of {c.batch_size}x{c.patch_size}^2 patches), W{m.w_bits}A{m.a_bits} '
                         f'{m.act_quantizer}/{m.levels}, protocol {m.protocol}')
        state_path, resume = self._resume_plan()
        # Hooks may run under no_grad; finetuning needs autograd.
        with torch.enable_grad():
            self.pipeline = run_pipeline(model, [batch.to(device) for batch in batches], m, progress=self.progress,
                                         calib_shard=(self.rank, self.world_size), finetune_source=calibration,
                                         state_path=state_path, resume=resume)
        if state_path is not None and state_path.parent != self.out_dir:
            # The folder held only the state; leave nothing behind once the run is complete.
            with contextlib.suppress(OSError):
                state_path.parent.rmdir()
        self.fp_net, self.calibration = model, calibration
        onnx_backend = self.run.backend == 'onnxruntime'
        # The ONNX Runtime backend validates the exported file; the artifacts come from the reference network.
        self.quant_net = to_backend(self.pipeline.model.to(device).eval(),
                                    'reference' if onnx_backend else self.run.backend)
        if self.is_main:
            self._write_artifacts(origin, arch, report_extra or {}, save_model)
        if self.run.export.onnx or onnx_backend:
            self.quant_net = self._export_onnx(batches[0][:1], onnx_backend)
        return self.quant_net

    def _export_onnx(self, example: torch.Tensor, validate: bool) -> nn.Module:
        """Write ``quantized.onnx`` (main process); with ``validate``, the network that runs it."""
        from ..pipeline.io.onnx_export import OnnxRuntimeNetwork, export_onnx
        if validate and self.world_size > 1:
            raise ConfigError("oaq.backend: onnxruntime validates in a single process; use another backend for "
                              'a distributed run (oaq.export.onnx still writes the file)')
        path = self.out_dir / ONNX_FILE
        if self.is_main:
            export_onnx(self.quant_net, path, example)
            self.logger.info(f'OAQ: ONNX model written to {path}')
            if self.report is not None:
                self.report.set('onnx', {'file': ONNX_FILE, 'bytes': path.stat().st_size,
                                         'validated_with_onnxruntime': validate})
                self.report.write()
        return OnnxRuntimeNetwork(path, model_device(self.quant_net)) if validate else self.quant_net

    def _resume_plan(self) -> Tuple[Optional[Path], bool]:
        """``(state path, resume)`` for the pipeline: interruptible in single-process runs with a state path."""
        resume = self.run.resume or self.resume
        if self.state_path is None:
            return None, False
        if self.world_size > 1:
            if resume:
                self.logger.warning('OAQ: resuming works in single-process runs only; starting from the beginning')
            return None, False
        if resume and self.state_path.is_file():
            self.logger.info(f'OAQ: resuming from {self.state_path}')
        elif resume:
            self.logger.info(f'OAQ: no saved state at {self.state_path}; starting from the beginning')
        elif self.state_path.is_file():
            self.logger.warning(f'OAQ: {self.state_path} holds the state of an interrupted run; starting afresh '
                                'instead (--auto_resume or oaq.resume: true continues it)')
        return self.state_path, resume

    def _write_artifacts(self, origin: str, arch: Optional[Mapping[str, Any]], extra: Mapping[str, Any],
                         save_model: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        sizes = {'fp': float_size_bytes(self.fp_net), 'quant': quantized_size_bytes(self.quant_net)}
        data: Dict[str, Any] = {'name': self.name, **extra, 'calibration': origin, 'scale': self.scale}
        if self.preset is not None:
            data['preset'] = self.preset
        data['run_options'] = self.run.to_dict()
        data['backend'] = backend_summary(self.quant_net)
        checkpoint = self.out_dir / QUANTIZED_FILE
        if save_model:
            save_quantized(self.quant_net, checkpoint, self.method, arch=arch)
            sizes['quantized_pth'] = checkpoint.stat().st_size
            data['histogram_layers'] = activation_histograms(self.quant_net, self.out_dir / HISTOGRAM_FILE)
        data['sizes_bytes'] = sizes
        data['protocol_note'] = PROTOCOL_NOTE
        self.report = RunReport(self.out_dir / REPORT_FILE, self.pipeline, extra=data)
        analysis = self.run.analysis
        if analysis.layer_sensitivity:
            self.report.set('layer_sensitivity', self._layer_sensitivity())
        if analysis.bit_allocation:
            self.report.set('bit_allocation', self._bit_allocation())
        self.report.write()
        timings = ', '.join(f'{k} {v:.1f}s' for k, v in self.pipeline.timings.items())
        written = checkpoint if save_model else self.out_dir / REPORT_FILE
        self.logger.info(f'OAQ: quantized model written to {written} ({timings})')

    # -- analyses (oaq.analysis) ---------------------------------------------------------------------
    def _holdout_crops(self) -> List[torch.Tensor]:
        """Centre crops of the first ``analysis.num_images`` calibration images (never a test set)."""
        count = min(self.run.analysis.num_images, len(self.calibration))
        size = self.method.calib.patch_size
        crops = []
        for index in range(count):
            image = self.calibration.image(index)
            top = max(image.shape[-2] - size, 0) // 2
            left = max(image.shape[-1] - size, 0) // 2
            crops.append(image[:, top:top + size, left:left + size])
        return crops

    def _bit_allocation(self) -> dict:
        """Sensitivity-driven bits per body layer against uniform bits, measured on held-out calibration crops."""
        from ..pipeline.analysis.sensitivity import sensitivity_allocation
        holdout = self._holdout_crops()
        rest = [self.calibration.images[i] for i in range(len(holdout), len(self.calibration))]
        if not rest:
            raise DataError('oaq.analysis.bit_allocation needs more calibration images than analysis.num_images')
        result = sensitivity_allocation(self.fp_net, PatchSource(rest), holdout, self.method, self.scale,
                                        progress=self.progress, analysis=self.run.analysis)
        self.logger.info(f'OAQ: bit allocation: fidelity {result.uniform_psnr:.2f} dB uniform, '
                         f'{result.allocated_psnr:.2f} dB allocated (held-out calibration crops)')
        return result.to_dict()

    def _layer_sensitivity(self) -> dict:
        """PSNR drop of each layer quantized alone, on calibration crops against the float output."""
        from ..pipeline.analysis.sensitivity import fidelity_pairs, layer_sensitivity, plot_sensitivity
        pairs = fidelity_pairs(self.fp_net, self._holdout_crops())
        report = layer_sensitivity(self.quant_net, pairs, self.scale, reference='fp',
                                   bits=self.run.analysis.sensitivity_bits, progress=self.progress)
        plot_sensitivity(report, self.out_dir / SENSITIVITY_FILE,
                         title=f'{type(self.fp_net).__name__}: PSNR drop with one layer quantized')
        self.logger.info('OAQ: per-layer sensitivity (fidelity PSNR drop, calibration crops)\n' + report.summary())
        return report.to_dict()

    # -- validation ------------------------------------------------------------------------------------
    def infer(self, network: nn.Module, lq: torch.Tensor) -> torch.Tensor:
        """``network`` on an LR batch as validation runs it: padded to the window, tiled per ``oaq.tile``."""
        tile = self.run.tile
        with torch.no_grad():
            return run_tiled(network, lq, self.scale, tile.size, tile.pad, self.window)

    def start_dataset(self, name: str) -> DatasetTally:
        """The tally of one test set (its clock starts now)."""
        return DatasetTally(name)

    def compare(self, tally: DatasetTally, image: str, quant: Any, fp: Any, gt: Any = None,
                metrics: Optional[Mapping[str, float]] = None, crop: bool = True) -> Dict[str, float]:
        """Measure one image: the caller's ``metrics`` (``fp_<m>``/``quant_<m>``), then fidelity PSNR and
        Delta E of the quantized against the float output; write its crop figure.

        Args:
            tally: The test set's tally.
            image: The image's name.
            quant, fp, gt: The outputs and the ground truth (or ``None``), (H, W, C) RGB uint8.
            metrics: The image's test metrics as the caller measured them.
            crop: Write the crop figure.
        """
        values = {**(metrics or {}), **compare_outputs(quant, fp, self.scale)}
        tally.add(image, values)
        if crop:
            write_crop(crop_path(self.out_dir, tally.name, image), quant, fp, gt, values)
        return values

    def finish_dataset(self, tally: DatasetTally, metrics: Sequence[str], **overrides: Any) -> Dict[str, Any]:
        """Gather the test set's images from every process, log its table and add it to the report.

        Args:
            tally: The test set's tally.
            metrics: The names of the test metrics (the per-image ``fp_<m>``/``quant_<m>`` are averaged).
            **overrides: Entries that replace the averaged ones (an evaluator's own ``fp``/``quant`` means,
                the dataset's ``num_images``).
        """
        tally.gather()
        result = {**tally.result(metrics), **overrides}
        self.logger.info(summary_table(tally.name, result))
        if self.is_main and self.report is not None:
            self.report.add_dataset(tally.name, result, tally.seconds)
        return result

    def validate(self, test_set: TestSet, to_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> Dict[str, Any]:
        """Validate the float and the quantized network on every image of ``test_set`` (this process only):
        PSNR/SSIM against the ground truth (Y channel, crop = scale), fidelity PSNR and Delta E, crops.

        Args:
            test_set: The images.
            to_input: Turns a read image (RGB (3, H, W) in [0, 1]) into the network's input (e.g. its luma
                for a one-channel network); the ground truth goes through it too.
        """
        from tqdm import tqdm
        convert = to_input or (lambda image: image)
        device = model_device(self.quant_net)
        tally = self.start_dataset(test_set.name)
        measured = TEST_METRICS if any(hr is not None for _, hr in test_set.pairs) else ()
        for lr_path, hr_path in tqdm(test_set.pairs, desc=f'validate {test_set.name}', unit='image',
                                     disable=not self.progress, file=sys.stderr):
            lq = convert(read_image(lr_path, 'test image'))[None].to(device)
            fp_img = tensor_to_uint8(self.infer(self.fp_net, lq))
            quant_img = tensor_to_uint8(self.infer(self.quant_net, lq))
            gt_img, values = None, {}
            if hr_path is not None:
                hr = convert(read_image(hr_path, 'ground-truth image'))
                gt_img = tensor_to_uint8(hr[:, :fp_img.shape[0], :fp_img.shape[1]])
                for metric, measure in (('psnr', psnr), ('ssim', ssim)):
                    values[f'fp_{metric}'] = measure(fp_img, gt_img, self.scale)
                    values[f'quant_{metric}'] = measure(quant_img, gt_img, self.scale)
            self.compare(tally, Path(lr_path).stem, quant_img, fp_img, gt_img, values)
        extra = {'lr_dir': str(test_set.lr_dir) if test_set.lr_dir else None,
                 'hr_dir': str(test_set.hr_dir) if test_set.hr_dir else None}
        return self.finish_dataset(tally, measured, **extra)

    def finish(self) -> ExperimentResult:
        """The run's result (the report as written)."""
        if self.is_main and self.report is not None:
            self.report.write()
        return ExperimentResult(self.quant_net, self.pipeline, dict(self.report.data) if self.report else {},
                                self.out_dir)


def run_experiment(model: nn.Module, calibration: PatchSource, test_sets: Sequence[TestSet],
                   options: Union[OAQOptions, OAQConfig, Mapping[str, Any], None], out_dir: PathLike,
                   logger: Optional[logging.Logger] = None, *, scale: int, window: int = 1,
                   to_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   arch: Optional[Mapping[str, Any]] = None, origin: Optional[str] = None,
                   report_extra: Optional[Mapping[str, Any]] = None, preset: Optional[str] = None,
                   progress: bool = True, state_path: Optional[PathLike] = None, resume: bool = False,
                   archive: bool = True) -> ExperimentResult:
    """The whole run for a caller without a test loop: checks, quantization, validation, artifacts.

    Everything is checked before ``out_dir`` is touched (the options, each test set's images); an existing
    ``out_dir`` is then archived as ``<name>_archived_<time>`` and the run writes a fresh one: ``run.txt``,
    ``quantized.pth``, ``activation_histograms.png``, ``oaq_report.json`` (with each test set), the crops
    and what ``oaq.analysis`` asks for.

    Args:
        model: The float network (left untouched), on the device to run on.
        calibration: The calibration pool (see :func:`~oaq_plugin.experiment.calibration_source`), already
            in the network's input layout.
        test_sets: The sets to validate on (may be empty).
        options: The ``oaq:`` section: the method and the run's options.
        out_dir: The results folder.
        logger: Where progress lines go (default: the ``oaq_plugin`` logger).
        scale: The network's scale.
        window: Inputs are padded to a multiple of this (a window transformer's window size).
        to_input: Turns a read RGB image into the network's input (see :meth:`Experiment.validate`).
        arch: How to rebuild the float skeleton (a BasicSR ``network_g``), stored in ``quantized.pth``.
        origin: Where the calibration pool came from (default: ``oaq.calib.dataroot_lq``).
        report_extra: More entries of ``oaq_report.json``.
        preset: A preset's name, for ``run.txt`` and the report.
        progress: Show progress bars.
        state_path: Makes the run interruptible (SIGINT/SIGTERM save its state there; see ``run_pipeline``).
        resume: Continue from ``state_path`` (as ``oaq.resume`` does).
        archive: Archive an existing ``out_dir`` (else it is written into).

    Raises:
        ConfigError, DataError: A bad option or input, before anything is written.
        Interrupted: The run was stopped at a safe point after saving its state to ``state_path``.
    """
    options = OAQOptions.coerce(options)
    names = [test_set.name for test_set in test_sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"test sets need distinct names, got {', '.join(names)}")
    for test_set in test_sets:
        test_set.check()
    experiment = Experiment(options, out_dir, logger, name=Path(out_dir).name, scale=scale, window=window,
                            progress=progress, state_path=state_path, resume=resume, preset=preset)
    experiment.warn_about_test_sets({test_set.name: test_set.files() for test_set in test_sets})
    if archive:
        archived = archive_existing(out_dir)
        if archived is not None:
            experiment.logger.info(f'OAQ: the previous {out_dir} was moved to {archived}')
    experiment.start()
    origin = origin or str(options.method.calib.dataroot_lq or f'{len(calibration)} images')
    experiment.quantize(model.eval(), calibration, origin, arch=arch, report_extra=report_extra)
    for test_set in test_sets:
        experiment.validate(test_set, to_input)
    return experiment.finish()
