"""``OAQModel``: a BasicSR test model that calibrates, searches, quantizes, then validates FP and quantized.

Configured by the option file's ``oaq:`` section (= :class:`~oaq_plugin.config.OAQConfig`). Everything
it writes goes under BasicSR's ``results/<name>/``: ``oaq_report.json``, ``quantized.pth``, the
activation-histogram PNG and FP-vs-quantized crops. The state of an interrupted run goes to
``experiments/<name>/oaq_resume_state.pth`` instead, since BasicSR archives ``results/<name>`` when a
test run starts.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict

import torch
from basicsr.metrics import calculate_metric
from basicsr.metrics.psnr_ssim import calculate_psnr
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from tqdm import tqdm

from ..config import OAQConfig
from ..errors import ConfigError, DataError
from ..pipeline.export import float_size_bytes, quantized_size_bytes, save_quantized
from ..pipeline.figures import activation_histograms, side_by_side_crop
from ..pipeline.inference import run_tiled
from ..pipeline.report import RunReport
from ..pipeline.resume import STATE_FILE_NAME
from ..pipeline.run import run_pipeline
from .calibration_data import calibration_source
from .metrics import calculate_delta_e


def resume_state_path(opt: dict) -> Path:
    """Where a run of option file ``opt`` keeps its resume state: ``<root>/experiments/<name>/``.

    Not under ``results/<name>``: BasicSR renames that folder (``_archived_<time>``) when a test run
    starts, so a rerun would not find it. A training run keeps it in its ``training_states`` folder,
    which BasicSR's own ``--auto_resume`` keeps too.
    """
    paths = opt['path']
    if paths.get('results_root'):
        root = Path(paths['results_root']).parent.parent
        return root / 'experiments' / opt['name'] / STATE_FILE_NAME
    return Path(paths.get('training_states') or paths.get('experiments_root') or '.') / STATE_FILE_NAME


def _distributed() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class OAQModel(SRModel):
    """SRModel whose network is quantized at construction and validated next to its float original.

    Option keys beyond SRModel's: ``oaq`` (the method's configuration, required, with ``calib``).
    """

    window_size = 1

    def __init__(self, opt: dict) -> None:
        if 'oaq' not in opt:
            raise ConfigError("the option file has no 'oaq:' section; OAQModel needs at least oaq.calib.dataroot_lq")
        self.oaq_config = OAQConfig.from_dict(opt['oaq'])
        self.calib_source = calibration_source(self.oaq_config.calib)
        super().__init__(opt)
        self.logger = get_root_logger()
        self.scale = int(opt.get('scale', 1))
        self.rank, self.world_size = _distributed()
        self.results_root = Path(opt['path'].get('results_root') or opt['path'].get('experiments_root') or '.')
        self.fp_net = self.get_bare_model(self.net_g).eval()
        self._quantize()

    def model_to_device(self, net):
        # Test-time only: no DistributedDataParallel wrapper (it needs CUDA and gradients); ranks split images.
        return net.to(self.device)

    # -- loading ---------------------------------------------------------------------------------
    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's loading, with clear errors for a missing, corrupt or mismatched checkpoint."""
        if not os.path.isfile(load_path):
            raise DataError(f'pretrained checkpoint {load_path} does not exist (path.pretrain_network_g)')
        try:
            state = torch.load(load_path, map_location='cpu', weights_only=True)
        except Exception as error:
            raise DataError(f'cannot read checkpoint {load_path}: {type(error).__name__}: {error}') from None
        if isinstance(state, dict) and param_key is not None and param_key not in state and 'params' not in state:
            param_key = None
        if param_key is not None and isinstance(state, dict):
            state = state.get(param_key, state.get('params'))
        if not isinstance(state, dict):
            raise DataError(f'checkpoint {load_path} holds no state dict')
        expected = set(self.get_bare_model(net).state_dict())
        found = {k[7:] if k.startswith('module.') else k for k in state}
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if strict and (missing or unexpected):
            raise DataError(
                f'checkpoint {load_path} does not match {type(self.get_bare_model(net)).__name__} '
                f'(network_g): {len(missing)} missing keys (first: {missing[:3]}), {len(unexpected)} unexpected '
                f'keys (first: {unexpected[:3]}); is it a checkpoint of another architecture or scale?')
        try:
            super().load_network(net, load_path, strict, param_key)
        except RuntimeError as error:
            raise DataError(f'checkpoint {load_path} does not fit network_g: {error}') from None

    # -- calibrate, search, finetune ---------------------------------------------------------------
    def _quantize(self) -> None:
        config = self.oaq_config
        c = config.calib
        batches = self.calib_source.batches(c.num_batches, c.batch_size, c.patch_size, c.seed)
        self.logger.info(f'OAQ: calibrating {type(self.fp_net).__name__} on {len(self.calib_source)} images '
                         f'({len(batches)} batches of {c.batch_size}x{c.patch_size}^2 patches), W{config.w_bits}'
                         f'A{config.a_bits} {config.act_quantizer}/{config.levels}, protocol {config.protocol}')
        state_path, resume = self._resume_options()
        self.result = run_pipeline(
            self.fp_net, [batch.to(self.device) for batch in batches], config, progress=self.rank == 0,
            calib_shard=(self.rank, self.world_size), finetune_source=self.calib_source,
            state_path=state_path, resume=resume)
        if state_path is not None:
            # The folder held only the state; leave nothing behind once the run is complete.
            with contextlib.suppress(OSError):
                state_path.parent.rmdir()
        self.quant_net = self.result.model.to(self.device).eval()
        self.backend = self._select_backend(config.kernel)
        if self.rank == 0:
            self._write_artifacts()

    def _resume_options(self) -> tuple:
        """``(state path, resume)`` for ``run_pipeline``: interruptible in single-process runs."""
        resume = self.oaq_config.resume or bool(self.opt.get('auto_resume'))
        if self.world_size > 1:
            if resume:
                self.logger.warning('OAQ: resuming works in single-process runs only; starting from the beginning')
            return None, False
        path = resume_state_path(self.opt)
        if resume and path.is_file():
            self.logger.info(f'OAQ: resuming from {path}')
        elif resume:
            self.logger.info(f'OAQ: no saved state at {path}; starting from the beginning')
        elif path.is_file():
            self.logger.warning(f'OAQ: {path} holds the state of an interrupted run; starting afresh instead '
                                '(--auto_resume or oaq.resume: true continues it)')
        return path, resume

    def _select_backend(self, kernel: str) -> Dict[str, str]:
        from ..backends.select import backend_summary, to_backend
        to_backend(self.quant_net, kernel)
        return backend_summary(self.quant_net)

    def _write_artifacts(self) -> None:
        self.results_root.mkdir(parents=True, exist_ok=True)
        checkpoint = self.results_root / 'quantized.pth'
        save_quantized(self.quant_net, checkpoint, self.oaq_config, arch=dict(self.opt['network_g']))
        histogram_layers = activation_histograms(self.quant_net, self.results_root / 'activation_histograms.png')
        self.report = RunReport(self.results_root / 'oaq_report.json', self.result, extra={
            'name': self.opt.get('name'),
            'network_g': dict(self.opt['network_g']),
            'pretrain_network_g': self.opt['path'].get('pretrain_network_g'),
            'backend': self.backend,
            'sizes_bytes': {'fp': float_size_bytes(self.fp_net), 'quant': quantized_size_bytes(self.quant_net),
                            'quantized_pth': checkpoint.stat().st_size},
            'histogram_layers': histogram_layers,
            'protocol_note': 'PSNR/SSIM as the val.metrics of the option file; fidelity_psnr = quantized vs FP '
                             'output (Y, crop = scale); delta_e = mean CIE76 Delta E quantized vs FP output',
        })
        analysis = self.oaq_config.analysis
        if analysis.layer_sensitivity:
            self.report.set('layer_sensitivity', self._layer_sensitivity())
        if analysis.bit_allocation:
            self.report.set('bit_allocation', self._bit_allocation())
        self.report.write()
        timings = ', '.join(f'{k} {v:.1f}s' for k, v in self.result.timings.items())
        self.logger.info(f'OAQ: quantized model written to {checkpoint} ({timings})')

    def _holdout_crops(self) -> list:
        """Centre crops of the first ``analysis.num_images`` calibration images (never a test set)."""
        count = min(self.oaq_config.analysis.num_images, len(self.calib_source))
        size = self.oaq_config.calib.patch_size
        crops = []
        for index in range(count):
            image = self.calib_source.image(index)
            top = max(image.shape[-2] - size, 0) // 2
            left = max(image.shape[-1] - size, 0) // 2
            crops.append(image[:, top:top + size, left:left + size])
        return crops

    def _bit_allocation(self) -> dict:
        """Sensitivity-driven bits per body layer against uniform bits, measured on held-out calibration crops."""
        from ..pipeline.patches import PatchSource
        from ..pipeline.sensitivity import sensitivity_allocation
        holdout = self._holdout_crops()
        rest = [self.calib_source.images[i] for i in range(len(holdout), len(self.calib_source))]
        if not rest:
            raise DataError('oaq.analysis.bit_allocation needs more calibration images than analysis.num_images')
        result = sensitivity_allocation(self.fp_net, PatchSource(rest), holdout, self.oaq_config, self.scale,
                                        progress=True)
        self.logger.info(f'OAQ: bit allocation: fidelity {result.uniform_psnr:.2f} dB uniform, '
                         f'{result.allocated_psnr:.2f} dB allocated (held-out calibration crops)')
        return result.to_dict()

    def _layer_sensitivity(self) -> dict:
        """PSNR drop of each layer quantized alone, on calibration crops against the float output."""
        from ..pipeline.sensitivity import fidelity_pairs, layer_sensitivity, plot_sensitivity
        pairs = fidelity_pairs(self.fp_net, self._holdout_crops())
        report = layer_sensitivity(self.quant_net, pairs, self.scale, reference='fp',
                                   bits=self.oaq_config.analysis.sensitivity_bits, progress=True)
        plot_sensitivity(report, self.results_root / 'layer_sensitivity.png',
                         title=f'{type(self.fp_net).__name__}: PSNR drop with one layer quantized')
        self.logger.info('OAQ: per-layer sensitivity (fidelity PSNR drop, calibration crops)\n' + report.summary())
        return report.to_dict()

    # -- inference ---------------------------------------------------------------------------------
    def _infer(self, net) -> torch.Tensor:
        tile = self.oaq_config.tile
        with torch.no_grad():
            return run_tiled(net, self.lq, self.scale, tile.size, tile.pad, self.window_size)

    def test(self):
        self.output = self._infer(self.quant_net)

    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        self._validate(dataloader, current_iter, save_img)

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validate(dataloader, current_iter, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validate(dataloader, current_iter, save_img)

    def _validate(self, dataloader, current_iter, save_img: bool) -> None:
        """Validate FP and quantized networks on one dataset; images are split across processes."""
        start = time.perf_counter()
        dataset_name = dataloader.dataset.opt['name']
        metrics_opt = OrderedDict(self.opt['val'].get('metrics') or {})
        names = list(metrics_opt) + ['fidelity_psnr', 'delta_e']
        sums = torch.zeros(2 * len(metrics_opt) + 3, dtype=torch.float64)
        crops_dir = self.results_root / 'crops' / dataset_name
        per_image = {}
        show = self.rank == 0 and self.opt['val'].get('pbar', True)
        for index, data in enumerate(tqdm(dataloader, desc=f'validate {dataset_name}', unit='image',
                                          disable=not show)):
            if index % self.world_size != self.rank:
                continue
            image_name = os.path.splitext(os.path.basename(data['lq_path'][0]))[0]
            self.feed_data(data)
            fp_img = tensor2img([self._infer(self.fp_net).cpu()])
            q_img = tensor2img([self._infer(self.quant_net).cpu()])
            gt_img = tensor2img([self.gt.cpu()]) if hasattr(self, 'gt') else None
            values = []
            for which in (fp_img, q_img):
                for metric_opt in metrics_opt.values():
                    if gt_img is None:
                        raise ConfigError(f"dataset '{dataset_name}' has no ground truth (dataroot_gt) for val.metrics")
                    values.append(calculate_metric({'img': which, 'img2': gt_img, 'img_fp': fp_img}, metric_opt))
            values.append(calculate_psnr(q_img, fp_img, self.scale, test_y_channel=True))
            values.append(calculate_delta_e(q_img, fp_img, crop_border=self.scale))
            per_image[image_name] = dict(zip([f'fp_{m}' for m in metrics_opt] + [f'quant_{m}' for m in metrics_opt]
                                             + ['fidelity_psnr', 'delta_e'], values))
            values.append(1.0)
            sums += torch.tensor(values, dtype=torch.float64)
            if save_img:
                suffix = self.opt['val'].get('suffix') or self.opt['name']
                folder = Path(self.opt['path']['visualization']) / dataset_name
                imwrite(q_img, str(folder / f'{image_name}_{suffix}.png'))
                imwrite(fp_img, str(folder / f'{image_name}_fp.png'))
            crops = [fp_img, q_img] if gt_img is None else [gt_img, fp_img, q_img]
            labels = ['FP', 'quantized'] if gt_img is None else ['ground truth', 'FP', 'quantized']
            side_by_side_crop(crops, labels, crops_dir / f'{image_name}.png')
            self._free()
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, per_image)
            per_image = {k: v for part in gathered for k, v in part.items()}
        count = max(float(sums[-1]), 1.0)
        means = (sums[:-1] / count).tolist()
        k = len(metrics_opt)
        result = {
            'fp': dict(zip(metrics_opt, means[:k])),
            'quant': dict(zip(metrics_opt, means[k:2 * k])),
            'fidelity_psnr': means[2 * k],
            'delta_e': means[2 * k + 1],
            'num_images': int(count),
            'per_image': dict(sorted(per_image.items())),
        }
        self.metric_results = result['quant']
        self._log_table(dataset_name, result, names)
        if self.rank == 0:
            self.report.add_dataset(dataset_name, result, time.perf_counter() - start)

    def _free(self) -> None:
        for attr in ('lq', 'gt', 'output'):
            if hasattr(self, attr):
                delattr(self, attr)

    def _log_table(self, dataset_name: str, result: dict, names) -> None:
        rows = [f'OAQ validation on {dataset_name} ({result["num_images"]} images):',
                f'\t{"metric":<14}{"FP":>10}{"quantized":>12}']
        for metric in result['fp']:
            rows.append(f'\t{metric:<14}{result["fp"][metric]:>10.4f}{result["quant"][metric]:>12.4f}')
        rows.append(f'\t{"fidelity_psnr":<14}{"":>10}{result["fidelity_psnr"]:>12.4f}')
        rows.append(f'\t{"delta_e":<14}{"":>10}{result["delta_e"]:>12.4f}')
        self.logger.info('\n'.join(rows))


class OAQSwinIRModel(OAQModel):
    """``OAQModel`` for SwinIR: inputs reflect-padded to a multiple of ``network_g.window_size``."""

    def __init__(self, opt: dict) -> None:
        self.window_size = int(opt['network_g'].get('window_size', 8))
        super().__init__(opt)
