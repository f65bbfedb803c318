"""mmengine adapter: OAQHook inside real Runners, the SRVGG config, weights-only checkpoint loading, metrics."""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip('mmengine')

from mmengine.registry import HOOKS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from oaq_plugin import ConfigError, DataError, OAQConfig  # noqa: E402
from oaq_plugin.mmengine_plugin import OAQHook, SuperResolutionModel, load_checkpoint_file  # noqa: E402
from oaq_plugin.mmengine_plugin.hook import input_images, locate_network, unwrap  # noqa: E402
from oaq_plugin.mmengine_plugin.metrics import psnr, ssim  # noqa: E402
from oaq_plugin.mmengine_plugin.run import build_runner  # noqa: E402
from oaq_plugin.pipeline.inference import TiledNetwork  # noqa: E402
from oaq_plugin.quant import DualRegionQuantizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / 'options' / 'mmengine_oaq_srvgg_x4.py'
REPORT_KEYS = {'config', 'layers', 'datasets', 'timings', 'peak_memory'}
# Small enough for a CPU test: no search, two batches of two small patches.
SMALL_OAQ = dict(search=dict(enabled=False), reconstruction=dict(enabled=False), distillation=dict(enabled=False),
                 calib=dict(num_batches=2, batch_size=2, patch_size=24))
SCALE = 2


class TinySR(nn.Module):
    """A random x2 network with the shape of the real ones: conv head, body, conv to pixels, PixelShuffle."""

    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, features, 3, padding=1)
        self.body = nn.Sequential(nn.PReLU(features), nn.Conv2d(features, features, 3, padding=1), nn.PReLU(features))
        self.tail = nn.Conv2d(features, 3 * SCALE * SCALE, 3, padding=1)
        self.upsample = nn.PixelShuffle(SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = torch.nn.functional.interpolate(x, scale_factor=SCALE, mode='nearest')
        return base + 0.1 * self.upsample(self.tail(self.body(self.head(x))))


def _write_images(folder: Path, names, size, seed: int, suffix: str = '') -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in names:
        height, width = size
        ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        image = np.clip(ramp * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 20, (height, width, 3)), 0, 255)
        cv2.imwrite(str(folder / f'{name}{suffix}.png'), image.astype(np.uint8))


@pytest.fixture
def synthetic(tmp_path):
    """Three HR/LR pairs (32x32 / 16x16) and four LR-only calibration images, written as PNG."""
    names = ['alpha', 'beta', 'gamma']
    _write_images(tmp_path / 'bench' / 'HR', names, (32, 32), seed=1)
    _write_images(tmp_path / 'bench' / 'LR', names, (16, 16), seed=2, suffix=f'x{SCALE}')
    _write_images(tmp_path / 'calib', ['c0', 'c1', 'c2', 'c3'], (20, 28), seed=3)
    return tmp_path


def _loader(dataset: dict) -> dict:
    return dict(batch_size=1, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
                collate_fn=dict(type='pseudo_collate'), dataset=dataset)


def _bench_dataset(root: Path) -> dict:
    return dict(type='PairedImageDataset', data_root=str(root / 'bench'), data_prefix=dict(lq='LR', gt='HR'),
                filename_tmpl=f'{{}}x{SCALE}', scale=SCALE, name='Synthetic')


def _calib_loader(root: Path) -> dict:
    return dict(dataset=dict(type='PairedImageDataset', data_prefix=dict(lq=str(root / 'calib')), name='calib'))


def _evaluator() -> list:
    return [dict(type='PSNRMetric', crop_border=SCALE), dict(type='SSIMMetric', crop_border=SCALE)]


def _tiny_runner(root: Path, work_dir: Path, hook: dict, **loops) -> Runner:
    torch.manual_seed(0)
    return Runner(model=SuperResolutionModel(generator=TinySR()), work_dir=str(work_dir), default_scope=None,
                  log_level='WARNING', custom_hooks=[dict(type='OAQHook', **hook)], **loops)


def _test_loops(root: Path) -> dict:
    return dict(test_dataloader=_loader(_bench_dataset(root)), test_evaluator=_evaluator(),
                test_cfg=dict(type='TestLoop'))


def _quantizers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, DualRegionQuantizer)]


def _check_report(path: Path, dataset: str, config: dict, num_images: int) -> dict:
    report = json.loads(path.read_text())
    assert REPORT_KEYS <= set(report)
    assert report['config'] == OAQConfig.from_dict(config).to_dict()
    assert report['layers'] and all(row['quantizer'] == 'DualRegionQuantizer' for row in report['layers'])
    entry = report['datasets'][dataset]
    assert set(entry) >= {'fp', 'quant', 'fidelity_psnr', 'delta_e', 'num_images'}
    assert entry['num_images'] == num_images
    for which in ('fp', 'quant'):
        assert set(entry[which]) == {'psnr', 'ssim'}
        assert all(math.isfinite(v) for v in entry[which].values())
    assert math.isfinite(entry['fidelity_psnr']) and entry['delta_e'] >= 0
    assert {'calibrate_s', 'search_s', 'finetune_s', 'validate_s'} <= set(report['timings'])
    assert report['timings']['validate_s'] > 0
    return report


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- configuration and import --------------------------------------------------------------------------
def test_core_import_leaves_mmengine_out_and_plugin_registers_the_hook():
    code = ("import sys, oaq_plugin\n"
            "assert 'mmengine' not in sys.modules, 'import oaq_plugin pulled in mmengine'\n"
            "from mmengine.utils import import_modules_from_strings\n"
            "import_modules_from_strings(['oaq_plugin.mmengine_plugin'], allow_failed_imports=False)\n"
            "from mmengine.registry import HOOKS, MODELS, DATASETS, METRICS\n"
            "assert HOOKS.get('OAQHook') and MODELS.get('SuperResolutionModel') and MODELS.get('SRDataPreprocessor')\n"
            "assert DATASETS.get('PairedImageDataset') and METRICS.get('PSNRMetric') and METRICS.get('SSIMMetric')\n"
            "assert 'basicsr' not in sys.modules, 'the mmengine adapter imported basicsr'\n")
    completed = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize('oaq, message', [
    (dict(w_bit=4), "unknown key 'w_bit' (did you mean 'w_bits'?)"),
    (dict(calib=dict(batchsize=2)), "oaq.calib: unknown key 'batchsize' (did you mean 'batch_size'?)"),
    (dict(a_bits=12), 'oaq.a_bits: 12 is outside the valid range'),
])
def test_bad_oaq_option_raises_config_error(oaq, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        HOOKS.build(dict(type='OAQHook', oaq=oaq))


def test_network_is_found_by_attribute_or_first_conv_child():
    model = SuperResolutionModel(generator=TinySR())
    assert locate_network(model, None) == (model, 'generator')
    assert locate_network(model, 'generator.body') == (model.generator, 'body')
    with pytest.raises(ConfigError, match="no submodule 'generatr'.*generator"):
        locate_network(model, 'generatr')


def test_unwrap_sees_through_distributed_data_parallel(tmp_path):
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel
    torch_dist.init_process_group('gloo', init_method=f'file://{tmp_path / "rendezvous"}', rank=0, world_size=1)
    try:
        model = SuperResolutionModel(generator=TinySR())
        wrapped = DistributedDataParallel(model)
        assert unwrap(wrapped) is model
        assert locate_network(unwrap(wrapped), None) == (model, 'generator')
    finally:
        torch_dist.destroy_process_group()


def test_input_images_accepts_the_usual_preprocessor_outputs():
    batch = torch.rand(2, 3, 8, 8)
    assert len(input_images(dict(inputs=batch))) == 2
    assert len(input_images(dict(inputs=[batch[0], batch[1]]))) == 2
    assert len(input_images((batch, None))) == 2
    with pytest.raises(DataError, match='cannot find the LR images'):
        input_images(dict(inputs='not a tensor'))


def test_calibration_patches_are_those_of_the_basicsr_adapter(synthetic):
    from mmengine.dataset import pseudo_collate

    from oaq_plugin.experiment.calibration_data import calibration_source
    from oaq_plugin.config import CalibConfig
    from oaq_plugin.mmengine_plugin import PairedImageDataset, SRDataPreprocessor
    from oaq_plugin.mmengine_plugin.hook import dataset_source
    calib = CalibConfig(dataroot_lq=str(synthetic / 'calib'), num_images=3, num_batches=2, batch_size=3,
                        patch_size=12, seed=5)
    dataset = PairedImageDataset(data_prefix=dict(lq=calib.dataroot_lq))
    ours = dataset_source(dataset, pseudo_collate, SRDataPreprocessor(), calib.num_images, calib.seed)
    theirs = calibration_source(calib)
    for mine, reference in zip(ours.batches(2, 3, 12, 5), theirs.batches(2, 3, 12, 5)):
        assert torch.equal(mine, reference)


# -- metrics -------------------------------------------------------------------------------------------
def test_psnr_and_ssim_match_basicsr_exactly():
    metrics = pytest.importorskip('basicsr.metrics.psnr_ssim')
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    image = np.clip(reference.astype(int) + rng.integers(-12, 13, reference.shape), 0, 255).astype(np.uint8)
    # BasicSR takes BGR images; ours are RGB.
    bgr, bgr_reference = image[..., ::-1], reference[..., ::-1]
    for crop in (0, 4):
        assert psnr(image, reference, crop) == metrics.calculate_psnr(bgr, bgr_reference, crop, test_y_channel=True)
        assert ssim(image, reference, crop) == pytest.approx(
            metrics.calculate_ssim(bgr, bgr_reference, crop, test_y_channel=True), abs=1e-12)
    assert psnr(image, image) == float('inf')


# -- the hook on a tiny random network (no shared data) -------------------------------------------------
def test_hook_quantizes_in_place_and_reports_on_a_tiny_network(synthetic, tmp_path):
    work_dir = tmp_path / 'work'
    runner = _tiny_runner(synthetic, work_dir, dict(oaq=SMALL_OAQ, calib_dataloader=_calib_loader(synthetic)),
                          **_test_loops(synthetic))
    fp_network = runner.model.generator
    fp_state = {k: v.clone() for k, v in fp_network.state_dict().items()}

    metrics = runner.test()

    assert set(metrics) == {'psnr', 'ssim'}
    assert len(_quantizers(runner.model.generator)) == 3
    assert runner.model.generator is not fp_network
    hook = next(h for h in runner.hooks if isinstance(h, OAQHook))
    assert hook.fp_network is fp_network and not _quantizers(fp_network)
    for key, value in fp_network.state_dict().items():
        assert torch.equal(value, fp_state[key]), f'float weight {key} changed'
    report = _check_report(work_dir / 'oaq_report.json', 'Synthetic', SMALL_OAQ, num_images=3)
    assert report['datasets']['Synthetic']['quant'] == pytest.approx(metrics)
    assert report['calibration'] == 'calib' and report['scale'] == SCALE
    assert (work_dir / 'quantized.pth').is_file()

    # A second test starts again from the float network rather than quantizing the quantized one.
    runner.test()
    assert hook.fp_network is fp_network and len(_quantizers(runner.model.generator)) == 3


def test_hook_finetunes_when_asked_without_touching_float_weights(synthetic, tmp_path):
    pytest.importorskip('oaq_plugin.pipeline.stages.finetune')
    oaq = dict(SMALL_OAQ, finetune=dict(enabled=True, epochs=1, iters_per_epoch=2, batch_size=2, patch_size=12))
    runner = _tiny_runner(synthetic, tmp_path / 'work', dict(oaq=oaq, calib_dataloader=_calib_loader(synthetic)),
                          **_test_loops(synthetic))
    fp_state = {k: v.clone() for k, v in runner.model.generator.state_dict().items()}

    runner.test()

    report = _check_report(tmp_path / 'work' / 'oaq_report.json', 'Synthetic', oaq, num_images=3)
    assert report['finetune'] is not None and report['timings']['finetune_s'] > 0
    hook = next(h for h in runner.hooks if isinstance(h, OAQHook))
    for key, value in hook.fp_network.state_dict().items():
        assert torch.equal(value, fp_state[key]), f'float weight {key} changed'


def test_hook_quantizes_for_validation_and_restores_float_after_it(synthetic, tmp_path):
    work_dir = tmp_path / 'work'
    runner = _tiny_runner(synthetic, work_dir, dict(oaq=SMALL_OAQ, before_val=True),
                          val_dataloader=_loader(_bench_dataset(synthetic)), val_evaluator=_evaluator(),
                          val_cfg=dict(type='ValLoop'))
    fp_network = runner.model.generator

    runner.val()

    assert runner.model.generator is fp_network
    report = _check_report(work_dir / 'oaq_report.json', 'Synthetic', SMALL_OAQ, num_images=3)
    # Without calib_dataloader the hook falls back to the validation set, and says so.
    assert report['calibration'] == 'Synthetic'
    log = next(work_dir.glob('*/*.log')).read_text()
    assert 'calibrating on the val set itself' in log


def test_hook_applies_every_run_option(synthetic, tmp_path):
    """backend, tile and analysis work in the hook, and it writes what the BasicSR adapter writes."""
    loops = _test_loops(synthetic)
    plain = _tiny_runner(synthetic, tmp_path / 'plain', dict(oaq=SMALL_OAQ, calib_dataloader=_calib_loader(synthetic)),
                         **loops)
    plain.test()
    work_dir = tmp_path / 'work'
    oaq = dict(SMALL_OAQ, backend='reference', tile=dict(size=8, pad=0),
               analysis=dict(layer_sensitivity=True, num_images=1))
    runner = _tiny_runner(synthetic, work_dir, dict(oaq=oaq, calib_dataloader=_calib_loader(synthetic)), **loops)

    runner.test()

    generator = runner.model.generator
    assert isinstance(generator, TiledNetwork) and generator.tile == 8 and len(_quantizers(generator)) == 3
    report = _check_report(work_dir / 'oaq_report.json', 'Synthetic', SMALL_OAQ, num_images=3)
    assert report['run_options']['tile'] == {'size': 8, 'pad': 0} and set(report['backend'].values()) == {'reference'}
    plain_report = json.loads((tmp_path / 'plain' / 'oaq_report.json').read_text())
    # Without context around the tiles their borders show in the float output too: both networks ran tiled.
    assert report['datasets']['Synthetic']['fp']['psnr'] != plain_report['datasets']['Synthetic']['fp']['psnr']
    assert (work_dir / 'layer_sensitivity.png').is_file() and report['layer_sensitivity']['layers']
    assert ': W4A4 dual_region/paper, protocol full, stages calibrate, backend reference' in (
        work_dir / 'run.txt').read_text()
    names = {'alpha', 'beta', 'gamma'}
    assert {p.stem for p in (work_dir / 'crops' / 'Synthetic').glob('*.png')} == names
    assert set(report['datasets']['Synthetic']['per_image']) == names
    assert (work_dir / 'oaq_report.json').stat().st_mode == (work_dir / 'quantized.pth').stat().st_mode


def test_hook_resumes_an_interrupted_quantization(synthetic, tmp_path, monkeypatch, caplog):
    from oaq_plugin import Interrupted
    from oaq_plugin.pipeline import resume
    work_dir = tmp_path / 'work'
    hook = dict(oaq=SMALL_OAQ, calib_dataloader=_calib_loader(synthetic))
    with monkeypatch.context() as patch:
        # As if SIGINT had arrived as the run started: it stops at the first safe point.
        patch.setattr(resume.StopRequest, '__init__', lambda self: setattr(self, 'signum', 2))
        with pytest.raises(Interrupted):
            _tiny_runner(synthetic, work_dir, hook, **_test_loops(synthetic)).test()
    state = work_dir / 'oaq_resume_state.pth'
    assert resume.load_state(state)['stage'] == 'calibrate'
    runner = _tiny_runner(synthetic, work_dir, dict(hook, oaq=dict(SMALL_OAQ, resume=True)), **_test_loops(synthetic))
    with caplog.at_level('INFO', logger='oaq_plugin'):
        runner.test()
    assert not state.exists() and (work_dir / 'oaq_report.json').is_file()
    assert f'OAQ: resuming from {state} (stage calibrate)' in caplog.text
    with pytest.raises(ConfigError, match=r'oaq\.resume: OAQHook resumes the quantization before a test'):
        HOOKS.build(dict(type='OAQHook', oaq=dict(resume=True), before_val=True))


def test_runner_cli_checks_the_config_before_the_work_dir_is_made(tmp_path):
    work_dir = tmp_path / 'work'
    with pytest.raises(DataError, match=r'gone\.pth does not exist \(model\.pretrained\)'):
        build_runner(str(CONFIG), work_dir=str(work_dir), cfg_options={'model.pretrained': str(tmp_path / 'gone.pth')})
    with pytest.raises(ConfigError, match="unknown key 'w_bitz'"):
        build_runner(str(CONFIG), work_dir=str(work_dir), cfg_options={'custom_hooks.0.oaq.w_bitz': 4})
    with pytest.raises(DataError, match=r'calibration folder .*nowhere does not exist'):
        build_runner(str(CONFIG), work_dir=str(work_dir), cfg_options={
            'custom_hooks.0.calib_dataloader': None,
            'custom_hooks.0.oaq.calib.dataroot_lq': str(tmp_path / 'nowhere')})
    assert not work_dir.exists()


# -- checkpoints ---------------------------------------------------------------------------------------
def test_runner_loads_a_checkpoint_mmengine_saved(synthetic, tmp_path):
    torch.manual_seed(0)
    trained = Runner(
        model=SuperResolutionModel(generator=TinySR()), work_dir=str(tmp_path / 'train'), default_scope=None,
        log_level='WARNING', train_dataloader=_loader(_bench_dataset(synthetic)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)), train_cfg=dict(by_epoch=False, max_iters=2),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)))
    trained.train()
    path = tmp_path / 'train' / 'iter_2.pth'
    # The file holds mmengine's message hub (HistoryBuffer, numpy arrays), which plain weights-only loading refuses.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location='cpu', weights_only=True)

    torch.manual_seed(1)
    fresh = Runner(model=SuperResolutionModel(generator=TinySR()), work_dir=str(tmp_path / 'load'),
                   default_scope=None, log_level='WARNING')
    checkpoint = fresh.load_checkpoint(str(path))

    assert 'message_hub' in checkpoint and checkpoint['meta']['iter'] == 2
    for key, value in trained.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value)


def test_objects_outside_the_allow_list_are_refused_with_a_clear_error(tmp_path):
    path = tmp_path / 'odd.pth'
    torch.save({'state_dict': {}, 'meta': {'ratio': Fraction(1, 3)}}, path)
    with pytest.raises(DataError, match=r'odd\.pth holds objects.*Fraction'):
        load_checkpoint_file(str(path))
    with pytest.raises(DataError, match='does not exist'):
        load_checkpoint_file(str(tmp_path / 'missing.pth'))


def test_model_loads_plain_state_dicts_and_names_mismatches(tmp_path):
    source = TinySR()
    path = tmp_path / 'tiny.pth'
    torch.save({'params': source.state_dict()}, path)
    model = SuperResolutionModel(generator=TinySR(), pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.generator.state_dict()[key], value)
    torch.save({'params': {**source.state_dict(), 'extra.weight': torch.zeros(1)}}, path)
    with pytest.raises(DataError, match='does not match TinySR: 0 missing keys.*1 unexpected'):
        SuperResolutionModel(generator=TinySR(), pretrained=str(path))


# -- the real config on the real checkpoint (shared data) -----------------------------------------------
def _basicsr_fp_psnr(shared: Path, names, checkpoint: Path) -> float:
    """Mean PSNR-Y of the float SRVGG on ``names`` through BasicSR's own reading, conversion and metric."""
    from basicsr.archs.srvgg_arch import SRVGGNetCompact
    from basicsr.metrics import calculate_psnr
    from basicsr.utils import img2tensor, tensor2img
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4, act_type='prelu')
    net.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=True)['params'])
    net.eval()
    values = []
    for name in names:
        folder = shared / 'data' / 'benchmark' / 'Set5'
        lr = cv2.imread(str(folder / 'LR_bicubic' / 'X4' / f'{name}x4.png')).astype(np.float32) / 255.
        hr = cv2.imread(str(folder / 'HR' / f'{name}.png'))
        with torch.no_grad():
            output = net(img2tensor(lr, bgr2rgb=True, float32=True)[None])
        values.append(calculate_psnr(tensor2img(output), hr, 4, test_y_channel=True))
    return float(np.mean(values))


@pytest.mark.slow
def test_srvgg_config_quantizes_and_reports_without_touching_the_checkpoint(shared, tmp_path, monkeypatch):
    checkpoint = shared / 'weights' / 'SRVGGNetCompact' / 'realesr-animevideov3.pth'
    digest = _sha256(checkpoint)
    small = dict(SMALL_OAQ, calib=dict(num_images=4, num_batches=2, batch_size=2, patch_size=32))
    # Any working directory: the config finds the shared folder itself.
    monkeypatch.chdir(tmp_path)
    runner = build_runner(str(CONFIG), work_dir=str(tmp_path / 'work'), cfg_options={
        'test_dataloader.dataset.indices': [1, 2],  # bird, butterfly: the two smallest LR images
        'custom_hooks.0.oaq': small,
    })
    fp_network = runner.model.generator

    metrics = runner.test()

    assert _quantizers(runner.model.generator) and not _quantizers(fp_network)
    report = _check_report(tmp_path / 'work' / 'oaq_report.json', 'Set5', dict(small, w_bits=4, a_bits=4,
                           act_quantizer='dual_region', protocol='full'), num_images=2)
    assert report['calibration'] == 'SunHays80' and report['scale'] == 4
    assert report['pretrain_network_g'] == str(checkpoint)
    fp_psnr = report['datasets']['Set5']['fp']['psnr']
    assert fp_psnr == pytest.approx(_basicsr_fp_psnr(shared, ['bird', 'butterfly'], checkpoint), abs=1e-9)
    assert metrics['psnr'] < fp_psnr
    assert _sha256(checkpoint) == digest
