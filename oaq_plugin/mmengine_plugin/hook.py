"""``OAQHook``: quantize the SR network inside an mmengine Runner before testing, and report what it measured.

Enable it from a config with ``custom_imports=dict(imports=['oaq_plugin.mmengine_plugin'],
allow_failed_imports=False)`` and ``custom_hooks=[dict(type='OAQHook', oaq=dict(...))]``. The run itself is
:class:`~oaq_plugin.experiment.Experiment`, as in the BasicSR adapter: the same ``oaq_report.json``,
``quantized.pth``, histograms, crops and ``run.txt``, written into ``runner.work_dir``.
"""
from __future__ import annotations

import copy
import functools
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine import dist
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn
from torch.utils.data import DataLoader

from ..config import OAQConfig, OAQOptions
from ..errors import ConfigError, DataError
from ..experiment import STATE_FILE, Experiment, calibration_source
from ..experiment.validation import DatasetTally
from ..pipeline.inference import TiledNetwork
from ..pipeline.io.patches import PatchSource
from ..pipeline.io.report import RunReport
from ..pipeline.metrics.image_quality import tensor_to_uint8
from ..pipeline.run import PipelineResult
from ..pipeline.stages.calibrate import model_device

PROBE_SIZE = 16


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP-style wrappers."""
    return model.module if is_model_wrapper(model) else model


def locate_network(model: nn.Module, attribute: Optional[str]) -> Tuple[nn.Module, str]:
    """``(parent, name)`` of the SR network: ``attribute`` (dotted), else the first child holding a Conv2d."""
    if attribute:
        parent_path, _, name = attribute.rpartition('.')
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            found = getattr(parent, name)
        except AttributeError:
            children = [child for child, _ in model.named_children()]
            raise ConfigError(f"OAQHook: {type(model).__name__} has no submodule '{attribute}' (attribute); its "
                              f"children are: {', '.join(children)}") from None
        if not isinstance(found, nn.Module):
            raise ConfigError(f"OAQHook: '{attribute}' of {type(model).__name__} is a {type(found).__name__}, "
                              'not a network')
        return parent, name
    for name, child in model.named_children():
        if name != 'data_preprocessor' and any(isinstance(m, nn.Conv2d) for m in child.modules()):
            return model, name
    raise ConfigError(f'OAQHook: no child of {type(model).__name__} holds a Conv2d layer; name the SR network '
                      "with attribute='...'")


def input_images(data: Any) -> List[torch.Tensor]:
    """The LR images (C, H, W) in what a data preprocessor returns: ``dict(inputs=...)`` or ``(inputs, ...)``."""
    if isinstance(data, Mapping):
        inputs = data.get('inputs')
    elif isinstance(data, (list, tuple)) and data:
        inputs = data[0]
    else:
        inputs = data
    if isinstance(inputs, torch.Tensor):
        tensors = [inputs]
    else:
        tensors = list(inputs) if isinstance(inputs, (list, tuple)) else []
    images: List[torch.Tensor] = []
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (3, 4):
            images = []
            break
        images.extend(tensor if tensor.dim() == 4 else [tensor])
    if not images:
        found = f'a tensor {tuple(inputs.shape)}' if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise DataError(f"OAQHook: cannot find the LR images in a preprocessed batch (found {found} as its "
                        "inputs); the data_preprocessor must return dict(inputs=...) with an (N, C, H, W) "
                        'tensor or a list of (C, H, W) tensors')
    return images


def dataset_source(dataset: Any, collate: Any, preprocessor: nn.Module, num_images: Optional[int],
                   seed: int) -> PatchSource:
    """A calibration pool of ``dataset``'s LR inputs, as the model sees them after its data preprocessor.

    Items are read by index rather than through the dataloader, so every process gets the same pool
    whatever the sampler, and only the images actually drawn are loaded.
    """
    indices = list(range(len(dataset)))
    if not indices:
        raise DataError(f'OAQHook: the calibration dataset {type(dataset).__name__} is empty')
    if num_images is not None and num_images < len(indices):
        indices = sorted(random.Random(seed).sample(indices, num_images))

    def load(index: int) -> torch.Tensor:
        with torch.no_grad():
            data = preprocessor(collate([dataset[index]]), False)
        return input_images(data)[0]

    loaders = [functools.partial(load, index) for index in indices]
    loaders[0]()  # fail here, naming the batch format, rather than deep inside calibration
    return PatchSource(loaders, [f'{type(dataset).__name__}[{index}]' for index in indices])


def _prediction(sample: Any, key: str = 'pred_img') -> Optional[torch.Tensor]:
    value = sample.get(key) if hasattr(sample, 'get') else None
    return getattr(value, 'data', value) if value is not None else None


def _number(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (np.number, int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def dataset_files(dataset: Any) -> List[Path]:
    """The image files a dataset reads: the ``*_path`` entries of its data infos (none for other datasets)."""
    files: List[Path] = []
    get_info = getattr(dataset, 'get_data_info', None)
    if get_info is None:
        return files
    for index in range(len(dataset)):
        info = get_info(index)
        if isinstance(info, Mapping):
            files += [Path(v) for k, v in info.items() if k.endswith('_path') and isinstance(v, str)]
    return files


@HOOKS.register_module()
class OAQHook(Hook):
    """Quantize the model's SR network before the test (and, if asked, each validation) and report on it.

    In ``before_test`` it calibrates on ``calib_dataloader``, quantizes a copy of the SR network (the
    float weights are never touched), optionally finetunes it, and puts the copy in the network's place
    inside ``runner.model``, where it stays after the test. During the test it also runs the float
    network on each batch, so that ``oaq_report.json`` (in ``runner.work_dir``) holds the test
    metrics of both, the fidelity PSNR of quantized vs float outputs and their mean Delta E, and
    ``crops/`` the side-by-side crops. Under ``before_val=True`` the same happens before each
    validation, and the float network is put back after it, before checkpoints are saved, so training
    goes on in float.

    Every option of the ``oaq:`` section works here: ``backend``; ``tile`` (the test loop then runs both
    networks tile by tile); ``analysis``; ``resume`` (a test run stopped by SIGINT/SIGTERM saves its state
    to ``work_dir/oaq_resume_state.pth``, single process only, not with ``before_val``).

    Args:
        oaq: The ``oaq:`` section of a BasicSR option file (:class:`~oaq_plugin.config.OAQOptions`, a mapping
            or an :class:`~oaq_plugin.config.OAQConfig`); unknown keys raise a ConfigError naming the closest.
        calib_dataloader: Dataloader (or its config) of the calibration images; its LR inputs pass the
            model's data preprocessor, then ``oaq.calib`` decides how many patches of which size are cut
            (``num_images`` of the dataset are used, all by default). Without it, the folder
            ``oaq.calib.dataroot_lq`` is read (RGB in [0, 1]); without that, the runner's test (val)
            dataloader is used, with a warning, as calibrating on the evaluation set flatters it.
        attribute: Dotted name of the SR network in the model (``generator``); by default the first child
            holding a Conv2d layer.
        before_val: Also quantize before every validation.
        compare_fp: Also run the float network during the test for the report (doubles test time).
        data_range: Value of white in the predictions' ``pred_img`` (1.0: images in [0, 1]).
        save_quantized: Write ``quantized.pth`` (packed low-bit weights) and the activation histograms.
    """

    priority = 'NORMAL'

    def __init__(self, oaq: Union[OAQOptions, OAQConfig, Mapping[str, Any], None] = None,
                 calib_dataloader: Union[DataLoader, Mapping[str, Any], None] = None,
                 attribute: Optional[str] = None, before_val: bool = False, compare_fp: bool = True,
                 data_range: float = 1.0, save_quantized: bool = True) -> None:
        self.options = OAQOptions.coerce(oaq)
        self.config = self.options.method
        if calib_dataloader is not None and not isinstance(calib_dataloader, (DataLoader, Mapping)):
            raise ConfigError(f'OAQHook: calib_dataloader must be a DataLoader or its config dict, got '
                              f'{type(calib_dataloader).__name__}')
        if self.options.run.resume and before_val:
            raise ConfigError('oaq.resume: OAQHook resumes the quantization before a test; with before_val=True it '
                              'quantizes at every validation, which is not resumable: leave resume off')
        # Checked now, before the runner starts: a missing or empty calibration folder stops the run here.
        self._folder_source = (calibration_source(self.config.calib)
                               if calib_dataloader is None and self.config.calib.dataroot_lq else None)
        self.calib_dataloader = calib_dataloader
        self.attribute = attribute
        self.quantize_before_val = before_val
        self.compare_fp = compare_fp
        self.data_range = float(data_range)
        self.save_quantized = save_quantized
        self.fp_network: Optional[nn.Module] = None
        self.quant_network: Optional[nn.Module] = None
        self.experiment: Optional[Experiment] = None
        self.result: Optional[PipelineResult] = None
        self.report: Optional[RunReport] = None
        self._location: Optional[Tuple[nn.Module, str]] = None
        # What is put in the network's place: the networks, or tiled runners of them (oaq.tile).
        self._fp_slot: Optional[nn.Module] = None
        self._quant_slot: Optional[nn.Module] = None
        self._fp_evaluator: Any = None
        self._tally: Optional[DatasetTally] = None
        self._scale = 0

    # -- stages ----------------------------------------------------------------------------------------
    def before_test(self, runner) -> None:
        self._quantize(runner, 'test')

    def before_test_epoch(self, runner) -> None:
        self._start_epoch(runner, runner.test_loop)

    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Optional[Sequence] = None
                        ) -> None:
        self._compare(runner, data_batch, outputs, 'test')

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        self._finish_epoch(runner, runner.test_loop, metrics)

    def before_val(self, runner) -> None:
        if self.quantize_before_val:
            self._quantize(runner, 'val')

    def before_val_epoch(self, runner) -> None:
        if self.quantize_before_val:
            self._start_epoch(runner, runner.val_loop)

    def after_val_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Optional[Sequence] = None
                       ) -> None:
        if self.quantize_before_val:
            self._compare(runner, data_batch, outputs, 'val')

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if self.quantize_before_val:
            self._finish_epoch(runner, runner.val_loop, metrics)
            # Back to float before CheckpointHook (a lower priority) saves: checkpoints and training stay float.
            self._put(self.fp_network)

    # -- quantization ----------------------------------------------------------------------------------
    def _quantize(self, runner, stage: str) -> None:
        model = unwrap(runner.model)
        parent, name = locate_network(model, self.attribute)
        network = getattr(parent, name)
        if self.quant_network is not None and network in (self.quant_network, self._quant_slot):
            network = self.fp_network  # a second test: start again from the float network
        network.eval()
        self._location = (parent, name)
        self.fp_network = network
        source, origin = self._calibration_source(runner, model, stage)
        rank, world = dist.get_rank(), dist.get_world_size()
        self._scale = self._probe_scale(network, source.image(0), model_device(network))
        work_dir = Path(runner.work_dir)
        self.experiment = Experiment(self.options, work_dir, runner.logger,
                                     name=getattr(runner, 'experiment_name', None), scale=self._scale,
                                     progress=rank == 0, rank=rank, world_size=world,
                                     state_path=work_dir / STATE_FILE if stage == 'test' else None)
        loader = runner.test_dataloader if stage == 'test' else runner.val_dataloader
        self.experiment.warn_about_test_sets({_dataset_name(loader.dataset): dataset_files(loader.dataset)})
        self.experiment.start()
        generator_cfg = getattr(model, 'generator_cfg', None)
        self.quant_network = self.experiment.quantize(
            network, source, origin, arch=generator_cfg, save_model=self.save_quantized, label=f' ({name})',
            report_extra={'network': {'attribute': self.attribute or name, 'type': type(network).__name__,
                                      'config': generator_cfg},
                          'pretrain_network_g': getattr(model, 'pretrained', None) or runner.cfg.get('load_from')})
        self.result, self.report = self.experiment.pipeline, self.experiment.report
        self._fp_slot, self._quant_slot = self._slot(self.fp_network), self._slot(self.quant_network)
        self._put(self._quant_slot)

    def _calibration_source(self, runner, model: nn.Module, stage: str) -> Tuple[PatchSource, str]:
        c = self.config.calib
        loader = self.calib_dataloader
        if loader is None and self._folder_source is not None:
            return self._folder_source, f'folder {c.dataroot_lq}'
        if loader is None:
            loader = runner.test_dataloader if stage == 'test' else runner.val_dataloader
            runner.logger.warning(f'OAQ: no calib_dataloader and no oaq.calib.dataroot_lq: calibrating on the '
                                  f'{stage} set itself, which makes its results optimistic')
        elif isinstance(loader, Mapping):
            options = dict(loader)
            # Only the dataset and collate function are used: items are read by index.
            options.setdefault('batch_size', 1)
            options.setdefault('sampler', dict(type='DefaultSampler', shuffle=False))
            loader = self.calib_dataloader = runner.build_dataloader(options)
        source = dataset_source(loader.dataset, loader.collate_fn, model.data_preprocessor, c.num_images, c.seed)
        return source, _dataset_name(loader.dataset)

    @staticmethod
    def _probe_scale(network: nn.Module, image: torch.Tensor, device: torch.device) -> int:
        side = min(PROBE_SIZE, image.shape[-2], image.shape[-1])
        with torch.no_grad():
            output = network(image[None, :, :side, :side].to(device))
        return max(int(output.shape[-1]) // side, 1)

    def _slot(self, network: nn.Module) -> nn.Module:
        """The network as the test loop should call it: tiled when ``oaq.tile.size`` asks."""
        tile = self.options.run.tile
        return TiledNetwork(network, self._scale, tile.size, tile.pad) if tile.size > 0 else network

    def _put(self, network: Optional[nn.Module]) -> None:
        if network is not None and self._location is not None:
            parent, name = self._location
            setattr(parent, name, network)

    # -- evaluation ------------------------------------------------------------------------------------
    def _start_epoch(self, runner, loop) -> None:
        self._tally = self.experiment.start_dataset(_dataset_name(loop.dataloader.dataset)) if self.experiment else None
        self._fp_evaluator = copy.deepcopy(loop.evaluator) if self.compare_fp else None

    @torch.no_grad()
    def _compare(self, runner, data_batch: Any, outputs: Optional[Sequence], stage: str) -> None:
        if self._fp_evaluator is None or outputs is None or self.quant_network is None or self._tally is None:
            return
        self._put(self._fp_slot)
        try:
            step = runner.model.test_step if stage == 'test' else runner.model.val_step
            fp_outputs = step(data_batch)
        finally:
            self._put(self._quant_slot)
        self._fp_evaluator.process(data_samples=fp_outputs, data_batch=data_batch)
        for quant_sample, fp_sample in zip(outputs, fp_outputs):
            quant, fp = _prediction(quant_sample), _prediction(fp_sample)
            if quant is None or fp is None:
                continue
            gt = _prediction(quant_sample, 'gt_img')
            metainfo = getattr(quant_sample, 'metainfo', None) or {}
            image = str(metainfo.get('img_name') or f'rank{dist.get_rank()}_image{len(self._tally.per_image)}')
            self.experiment.compare(self._tally, image, tensor_to_uint8(quant, self.data_range),
                                    tensor_to_uint8(fp, self.data_range),
                                    None if gt is None else tensor_to_uint8(gt, self.data_range))

    def _finish_epoch(self, runner, loop, metrics: Optional[Dict[str, float]]) -> None:
        if self.quant_network is None or self._tally is None:
            return
        dataset = loop.dataloader.dataset
        fp_metrics = self._fp_evaluator.evaluate(len(dataset)) if self._fp_evaluator is not None else {}
        self.experiment.finish_dataset(self._tally, (), fp={k: _number(v) for k, v in fp_metrics.items()},
                                       quant={k: _number(v) for k, v in (metrics or {}).items()},
                                       num_images=len(dataset))


def _dataset_name(dataset: Any) -> str:
    metainfo = getattr(dataset, 'metainfo', None) or {}
    return str(metainfo.get('dataset_name') or type(dataset).__name__)
