"""``OAQModel``: a BasicSR test model that calibrates, searches, quantizes, then validates FP and quantized.

Configured by the option file's ``oaq:`` section (:class:`~oaq_plugin.config.OAQOptions`: the method and
the run's options). The run itself is :class:`~oaq_plugin.experiment.Experiment`; this class brings what
BasicSR owns: the network and its checkpoint, the test loop and ``val.metrics``. Everything it writes goes
under BasicSR's ``results/<name>/``; the state of an interrupted run goes to
``experiments/<name>/oaq_resume_state.pth`` instead, since BasicSR archives ``results/<name>`` when a test
run starts.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from torch import nn
from tqdm import tqdm

from ..backends.select import backend_summary
from ..config import OAQOptions
from ..errors import ConfigError, DataError
from ..experiment import STATE_FILE, Experiment, calibration_source
from ..experiment.calibration_data import image_files
from ..loading import read_checkpoint
from .spandrel_arch import loaded_from, network_options


def resume_state_path(opt: dict) -> Path:
    """Where a run of option file ``opt`` keeps its resume state: ``<root>/experiments/<name>/``.

    Not under ``results/<name>``: BasicSR renames that folder (``_archived_<time>``) when a test run
    starts, so a rerun would not find it. A training run keeps it in its ``training_states`` folder,
    which BasicSR's own ``--auto_resume`` keeps too.
    """
    paths = opt['path']
    if paths.get('results_root'):
        root = Path(paths['results_root']).parent.parent
        return root / 'experiments' / opt['name'] / STATE_FILE
    return Path(paths.get('training_states') or paths.get('experiments_root') or '.') / STATE_FILE


def test_set_files(opt: Mapping[str, Any]) -> Dict[str, List[Path]]:
    """``{test set name: its image files}`` for the option file's ``datasets`` (LR and HR folders)."""
    files = {}
    for key, dataset in (opt.get('datasets') or {}).items():
        if not key.startswith(('test', 'val')) or not isinstance(dataset, Mapping):
            continue
        folders = [dataset.get('dataroot_lq'), dataset.get('dataroot_gt')]
        files[str(dataset.get('name', key))] = [path for folder in folders if folder for path in image_files(folder)]
    return files


def check_checkpoint(network: nn.Module, load_path: str, strict: bool = True,
                     param_key: Optional[str] = 'params') -> Optional[str]:
    """Refuse a missing, unreadable or mismatched checkpoint of ``network``, with a message naming the problem.

    Returns:
        The key of the state dict inside the file (``None``: the file is the state dict itself).

    Raises:
        DataError: The file is missing, not a checkpoint, or does not hold ``network``'s parameters.
    """
    if not os.path.isfile(load_path):
        raise DataError(f'pretrained checkpoint {load_path} does not exist (path.pretrain_network_g)')
    state = read_checkpoint(load_path)  # one line, not torch's advice, for a file that is not a checkpoint
    if isinstance(state, dict) and param_key is not None and param_key not in state and 'params' not in state:
        param_key = None
    if param_key is not None and isinstance(state, dict):
        state = state.get(param_key, state.get('params'))
    if not isinstance(state, dict):
        raise DataError(f'checkpoint {load_path} holds no state dict')
    expected = set(network.state_dict())
    found = {k[7:] if k.startswith('module.') else k for k in state}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if strict and (missing or unexpected):
        raise DataError(
            f'checkpoint {load_path} does not match {type(network).__name__} (network_g): {len(missing)} missing '
            f'keys (first: {missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]}); is it a '
            'checkpoint of another architecture or scale?')
    return param_key


def _distributed() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _rgb(image: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """BasicSR's BGR uint8 image (``tensor2img``) as RGB; grayscale passes through."""
    if image is None or image.ndim != 3 or image.shape[-1] != 3:
        return image
    return image[..., ::-1]


class OAQModel(SRModel):
    """SRModel whose network is quantized at construction and validated next to its float original.

    Option keys beyond SRModel's: ``oaq`` (required, with ``calib.dataroot_lq``).
    """

    window_size = 1

    def __init__(self, opt: dict) -> None:
        if 'oaq' not in opt:
            raise ConfigError("the option file has no 'oaq:' section; OAQModel needs at least oaq.calib.dataroot_lq")
        self.oaq_options = OAQOptions.from_dict(opt['oaq'])
        self.oaq_config = self.oaq_options.method
        self.calib_source = calibration_source(self.oaq_config.calib)
        opt['network_g'] = network_options(opt)  # a Spandrel arch gets its checkpoint and scale
        super().__init__(opt)
        self.logger = get_root_logger()
        self.scale = int(opt.get('scale', 1))
        self.rank, self.world_size = _distributed()
        self.results_root = Path(opt['path'].get('results_root') or opt['path'].get('experiments_root') or '.')
        self.fp_net = self.get_bare_model(self.net_g).eval()
        self.experiment = Experiment(
            self.oaq_options, self.results_root, self.logger, name=opt.get('name'), scale=self.scale,
            window=self.window_size, progress=self.rank == 0, rank=self.rank, world_size=self.world_size,
            state_path=resume_state_path(opt), resume=bool(opt.get('auto_resume')))
        self.experiment.warn_about_test_sets(test_set_files(opt))
        self.experiment.start()
        self.quant_net = self.experiment.quantize(
            self.fp_net, self.calib_source, f'folder {self.oaq_config.calib.dataroot_lq}',
            arch=dict(opt['network_g']),
            report_extra={'network_g': dict(opt['network_g']),
                          'pretrain_network_g': opt['path'].get('pretrain_network_g')})
        self.result = self.experiment.pipeline
        self.report = self.experiment.report
        self.backend = backend_summary(self.quant_net)

    def model_to_device(self, net):
        # Test-time only: no DistributedDataParallel wrapper (it needs CUDA and gradients); ranks split images.
        return net.to(self.device)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's loading, with clear errors for a missing, corrupt or mismatched checkpoint."""
        if not os.path.isfile(load_path):
            raise DataError(f'pretrained checkpoint {load_path} does not exist (path.pretrain_network_g)')
        if loaded_from(self.get_bare_model(net), load_path):
            return  # a Spandrel network, built from this very file with its weights
        param_key = check_checkpoint(self.get_bare_model(net), load_path, strict, param_key)
        try:
            super().load_network(net, load_path, strict, param_key)
        except RuntimeError as error:
            raise DataError(f'checkpoint {load_path} does not fit network_g: {error}') from None

    # -- inference ---------------------------------------------------------------------------------
    def test(self):
        self.output = self.experiment.infer(self.quant_net, self.lq)

    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        self._validate(dataloader, current_iter, save_img)

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validate(dataloader, current_iter, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validate(dataloader, current_iter, save_img)

    def _validate(self, dataloader, current_iter, save_img: bool) -> None:
        """Validate FP and quantized networks on one dataset; images are split across processes."""
        dataset_name = dataloader.dataset.opt['name']
        metrics_opt = OrderedDict(self.opt['val'].get('metrics') or {})
        tally = self.experiment.start_dataset(dataset_name)
        show = self.rank == 0 and self.opt['val'].get('pbar', True)
        for index, data in enumerate(tqdm(dataloader, desc=f'validate {dataset_name}', unit='image',
                                          disable=not show)):
            if index % self.world_size != self.rank:
                continue
            image_name = os.path.splitext(os.path.basename(data['lq_path'][0]))[0]
            self.feed_data(data)
            fp_img = tensor2img([self.experiment.infer(self.fp_net, self.lq).cpu()])
            q_img = tensor2img([self.experiment.infer(self.quant_net, self.lq).cpu()])
            gt_img = tensor2img([self.gt.cpu()]) if hasattr(self, 'gt') else None
            values = {}
            for prefix, which in (('fp', fp_img), ('quant', q_img)):
                for metric, metric_opt in metrics_opt.items():
                    if gt_img is None:
                        raise ConfigError(f"dataset '{dataset_name}' has no ground truth (dataroot_gt) for val.metrics")
                    values[f'{prefix}_{metric}'] = calculate_metric({'img': which, 'img2': gt_img, 'img_fp': fp_img},
                                                                    metric_opt)
            self.experiment.compare(tally, image_name, _rgb(q_img), _rgb(fp_img), _rgb(gt_img), values)
            if save_img:
                suffix = self.opt['val'].get('suffix') or self.opt['name']
                folder = Path(self.opt['path']['visualization']) / dataset_name
                imwrite(q_img, str(folder / f'{image_name}_{suffix}.png'))
                imwrite(fp_img, str(folder / f'{image_name}_fp.png'))
            self._free()
        result = self.experiment.finish_dataset(tally, list(metrics_opt))
        self.metric_results = result['quant']

    def _free(self) -> None:
        for attr in ('lq', 'gt', 'output'):
            if hasattr(self, attr):
                delattr(self, attr)


class OAQSwinIRModel(OAQModel):
    """``OAQModel`` for SwinIR: inputs reflect-padded to a multiple of ``network_g.window_size``."""

    def __init__(self, opt: dict) -> None:
        self.window_size = int(opt['network_g'].get('window_size', 8))
        super().__init__(opt)
