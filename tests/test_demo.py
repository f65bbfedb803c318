"""The embedded demo: committed weights, the train/held-out split, its option files, and one reduced run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip('skimage', reason='the demo images come from scikit-image')

from basicsr.metrics.psnr_ssim import calculate_psnr  # noqa: E402

from oaq_plugin.config import OAQOptions  # noqa: E402
from oaq_plugin.demo import demo_data, network, runner, sample_images  # noqa: E402

REGISTER_LINE = 'oaq_register: !!python/name:oaq_plugin.register'


def psnr_y(rgb: np.ndarray, reference: np.ndarray) -> float:
    # BasicSR's Y channel expects BGR, the order in which it reads files.
    return calculate_psnr(rgb[..., ::-1], reference[..., ::-1], sample_images.SCALE, test_y_channel=True)


def super_resolve(net: torch.nn.Module, lr: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))).float().div(255).unsqueeze(0)
        y = net(x).clamp(0, 1).mul(255).round().byte()[0]
    return y.permute(1, 2, 0).numpy()


def test_weights_are_small_and_load_strictly():
    assert network.WEIGHTS_PATH.stat().st_size <= 2 * 1024 * 1024
    state = torch.load(network.WEIGHTS_PATH, map_location='cpu', weights_only=True)
    assert set(state) == {'params'}
    net = network.build_network()
    assert set(state['params']) == set(net.state_dict())
    network.load_network()


def test_split_keeps_test_images_out_of_training():
    assert not set(sample_images.HELD_OUT_IMAGES) & set(sample_images.TRAIN_IMAGES)
    assert set(sample_images.CALIBRATION_IMAGES) <= set(sample_images.TRAIN_IMAGES)
    # Different names can hold the same picture (skimage.data.cat is chelsea): compare the pixels.
    held_out = {name: sample_images.load_rgb(name) for name in sample_images.HELD_OUT_IMAGES}
    for name in sample_images.TRAIN_IMAGES:
        image = sample_images.load_rgb(name)
        for other, pixels in held_out.items():
            assert image.shape != pixels.shape or not np.array_equal(image, pixels), (name, other)


def test_network_beats_bicubic_on_a_held_out_image():
    hr, lr = sample_images.hr_lr_pair('chelsea')
    ours = psnr_y(super_resolve(network.load_network(), lr), hr)
    bicubic = psnr_y(sample_images.bicubic_resize(lr, sample_images.SCALE), hr)
    assert ours > bicubic + 0.3, (ours, bicubic)


@pytest.mark.parametrize('run', runner.RUNS, ids=lambda run: run.name)
def test_option_files_parse(run):
    text = run.option_file.read_text()
    assert text.splitlines()[0].startswith(REGISTER_LINE)
    options = yaml.load(text, Loader=yaml.UnsafeLoader)
    config = OAQOptions.from_dict(options['oaq']).method
    assert options['name'] == run.name
    assert options['model_type'] == 'OAQModel'
    assert options['network_g'] == network.NETWORK_G
    assert options['path'] == {'pretrain_network_g': str(demo_data.DATA_ROOT / demo_data.WEIGHTS_NAME),
                               'strict_load_g': True, 'param_key_g': 'params'}
    dataset = options['datasets']['test_1']
    assert dataset['name'] == runner.DATASET
    assert dataset['dataroot_gt'] == str(demo_data.DATA_ROOT / demo_data.TEST_HR)
    assert dataset['dataroot_lq'] == str(demo_data.DATA_ROOT / demo_data.TEST_LR)
    assert config.calib.dataroot_lq == str(demo_data.DATA_ROOT / demo_data.CALIB_LR)
    bits = int(run.name.split('_')[2][1])
    assert (config.w_bits, config.a_bits) == (bits, bits)
    assert config.act_quantizer == ('minmax' if run.name.endswith('minmax') else 'dual_region')
    assert (config.levels, config.protocol, config.finetune.enabled) == ('paper', 'full', False)
    # Every key spelled out: the files are examples to copy, so nothing may hide behind a default.
    # (unknown keys are already refused by OAQOptions.from_dict above; this catches missing ones.)
    defaults = OAQOptions().to_dict()
    missing = sorted(set(defaults) - set(options['oaq']))
    for section, values in defaults.items():
        if isinstance(values, dict) and section != 'layer_bits':
            missing += [f'{section}.{key}' for key in values if key not in options['oaq'][section]]
    assert not missing, (f'{run.option_file} does not spell out oaq keys {missing}; add them with their '
                         f'defaults from OAQOptions')


def test_demo_data_is_a_paired_set_and_is_reused(tmp_path):
    root = tmp_path / 'data'
    assert demo_data.write_demo_data(root, test_images=('chelsea',), calib_images=('camera',))
    hr = sorted(p.name for p in (root / demo_data.TEST_HR).iterdir())
    lr = sorted(p.name for p in (root / demo_data.TEST_LR).iterdir())
    assert hr == lr == ['chelsea.png']
    assert sorted(p.name for p in (root / demo_data.CALIB_LR).iterdir()) == ['camera.png']
    assert not demo_data.write_demo_data(root, test_images=('chelsea',), calib_images=('camera',))
    with pytest.raises(ValueError):
        demo_data.write_demo_data(root, test_images=('rocket',))


def test_reruns_keep_one_archive_per_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = runner.RUNS[0]
    for stamp in ('20250101_000000', '20250102_000000'):
        (runner.RESULTS / f'{run.name}_archived_{stamp}').mkdir(parents=True)
    (runner.RESULTS / run.name).mkdir()
    other = runner.RESULTS / f'{runner.RUNS[1].name}_archived_20250101_000000'
    other.mkdir()
    assert len(runner.prune_archives(run)) == 2
    # The last results stay for BasicSR to archive; other runs' archives are not this run's business.
    assert (runner.RESULTS / run.name).is_dir() and other.is_dir()


@pytest.mark.slow
def test_reduced_demo_run(tmp_path, monkeypatch, capsys):
    """One MinMax W4A4 run on one image, through the demo's own code path and BasicSR."""
    monkeypatch.chdir(tmp_path)
    run = runner.RUNS[2]
    assert run.name == 'oaq_demo_W4A4_minmax'
    assert runner.main(['--only', run.name, '--images', 'chelsea']) == 0
    printed = capsys.readouterr().out
    assert 'W4A4 MinMax' in printed and 'FP (float32)' in printed
    assert 'W4A4 MinMax' in (tmp_path / 'results' / 'oaq_demo_summary.txt').read_text()
    report = json.loads((tmp_path / 'results' / run.name / 'oaq_report.json').read_text())
    metrics = report['datasets'][runner.DATASET]
    assert metrics['num_images'] == 1
    # The float row of the BasicSR run is the same measurement as this file's direct one.
    hr, lr = sample_images.hr_lr_pair('chelsea')
    assert metrics['fp']['psnr'] == pytest.approx(psnr_y(super_resolve(network.load_network(), lr), hr), abs=1e-3)
    assert 20.0 < metrics['fidelity_psnr'] < 100.0
