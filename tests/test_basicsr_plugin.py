"""The BasicSR plugin end to end: an option file turns a test run into calibrate -> quantize -> validate."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ('bird', 'butterfly')


def shared_option_file(shared: Path, world: Path, name: str, **oaq_overrides) -> Path:
    """A copy of options/oaq_srvgg_x4.yml on a small world: 2 Set5 images, 4 calibration images, tiny calibration."""
    text = (ROOT / 'options' / 'oaq_srvgg_x4.yml').read_text().replace('../shared', str(shared))
    register_line = text.splitlines()[0]
    options = yaml.load(text, Loader=yaml.UnsafeLoader)
    options.pop('oaq_register')
    for kind, pattern in (('HR', '{}.png'), ('LR_bicubic/X4', '{}x4.png')):
        folder = world / 'Set5' / kind
        folder.mkdir(parents=True, exist_ok=True)
        for image in IMAGES:
            target = folder / pattern.format(image)
            if not target.exists():
                target.symlink_to(shared / 'data/benchmark/Set5' / kind / pattern.format(image))
    calib = world / 'calib'
    calib.mkdir(exist_ok=True)
    for path in sorted((shared / 'data/calib/SunHays80/LR_bicubic/X4').glob('*.png'))[:4]:
        if not (calib / path.name).exists():
            (calib / path.name).symlink_to(path)
    options['name'] = name
    options['datasets'] = {'test_1': dict(options['datasets']['test_1'], dataroot_gt=str(world / 'Set5/HR'),
                                          dataroot_lq=str(world / 'Set5/LR_bicubic/X4'))}
    options['val']['pbar'] = False
    oaq = options['oaq']
    oaq['calib'].update(dataroot_lq=str(calib), num_batches=2, batch_size=2, patch_size=32)
    oaq['search'].update(num_samples=2, grid_size=4, refine_rounds=0)
    # Block reconstruction and distillation (on in the shipped files) run, briefly.
    oaq['reconstruction'].update(iterations=2, num_samples=2, patch_size=16, batch_size=1)
    oaq['distillation'].update(iterations=2, patch_size=16, batch_size=1, check_crops=1)
    oaq['backend'] = 'fake'
    for key, value in oaq_overrides.items():
        if isinstance(value, dict):
            oaq[key].update(value)
        else:
            oaq[key] = value
    path = world / f'{name}.yml'
    path.write_text(register_line + '\n' + yaml.safe_dump(options, sort_keys=False))
    return path


@pytest.fixture(scope='module')
def plugin_run(shared, tmp_path_factory):
    """One run of ``python -m oaq_plugin.test`` on a small world, in its own working directory."""
    world = tmp_path_factory.mktemp('basicsr_world')
    option_file = shared_option_file(shared, world, 'oaq_srvgg_small', analysis={'layer_sensitivity': True,
                                                                                 'num_images': 1})
    weights = shared / 'weights/SRVGGNetCompact/realesr-animevideov3.pth'
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = subprocess.run([sys.executable, '-m', 'oaq_plugin.test', '-opt', str(option_file)], cwd=world,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest, 'the pretrained checkpoint was modified'
    (world / 'plugin_run.out').write_text(result.stdout)
    return world, option_file, world / 'results' / 'oaq_srvgg_small'


def test_register_is_idempotent():
    import oaq_plugin
    from basicsr.utils.registry import ARCH_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY
    oaq_plugin.register()
    oaq_plugin.register()
    from oaq_plugin.basicsr_plugin import registration
    registration._registered = False
    registration.register()
    assert 'OAQModel' in MODEL_REGISTRY and 'OAQSwinIRModel' in MODEL_REGISTRY
    assert 'IMDN' in ARCH_REGISTRY and 'calculate_delta_e' in METRIC_REGISTRY


def test_report_schema_and_artifacts(plugin_run):
    _, _, results = plugin_run
    report = json.loads((results / 'oaq_report.json').read_text())
    assert set(report['datasets']) == {'Set5'}
    set5 = report['datasets']['Set5']
    assert set(set5) >= {'fp', 'quant', 'fidelity_psnr', 'delta_e'}
    assert set(set5['fp']) == {'psnr', 'ssim'} and set(set5['quant']) == {'psnr', 'ssim'}
    assert set5['quant']['psnr'] < set5['fp']['psnr'] and set5['delta_e'] > 0
    assert {'calibrate_s', 'search_s', 'finetune_s', 'validate_s'} <= set(report['timings'])
    row = report['layers'][1]
    assert {'name', 'w_bits', 'a_bits', 'lower', 'upper', 'breakpoint', 'w_clip', 'outlier_fraction'} <= set(row)
    assert report['layers'][0]['a_bits'] == 8 and row['a_bits'] == 4
    assert report['config']['w_bits'] == 4 and report['peak_memory']['cpu_peak_rss_mib'] > 0
    assert (results / 'quantized.pth').is_file() and (results / 'activation_histograms.png').is_file()
    assert (results / 'layer_sensitivity.png').is_file()
    drops = {row['name']: row['drop'] for row in report['layer_sensitivity']['layers']}
    assert set(drops) == {row['name'] for row in report['layers']}
    assert sorted(p.stem for p in (results / 'crops' / 'Set5').glob('*.png')) == sorted(f'{i}x4' for i in IMAGES)


def test_fp_metrics_equal_plain_basicsr(plugin_run):
    world, option_file, results = plugin_run
    from basicsr.models import build_model
    from basicsr.data import build_dataloader, build_dataset
    options = yaml.load(option_file.read_text(), Loader=yaml.UnsafeLoader)
    options.update(model_type='SRModel', is_train=False, dist=False, rank=0, world_size=1, num_gpu=0)
    dataset_opt = dict(options['datasets']['test_1'], phase='test', scale=4)
    loader = build_dataloader(build_dataset(dataset_opt), dataset_opt, num_gpu=0, dist=False, sampler=None)
    model = build_model(options)
    model.nondist_validation(loader, 0, None, False)
    report = json.loads((results / 'oaq_report.json').read_text())
    for metric, value in model.metric_results.items():
        assert report['datasets']['Set5']['fp'][metric] == pytest.approx(value, abs=1e-9)


def test_load_quantized_reproduces_reported_quality(plugin_run):
    world, _, results = plugin_run
    import cv2
    from basicsr.metrics.psnr_ssim import calculate_psnr
    from basicsr.utils import img2tensor, tensor2img
    import oaq_plugin
    from oaq_plugin.quant import DualRegionQuantizer
    qmodel = oaq_plugin.load_quantized(results / 'quantized.pth')
    assert any(isinstance(m, DualRegionQuantizer) for m in qmodel.modules())
    psnrs = []
    for image in IMAGES:
        lq = img2tensor(cv2.imread(str(world / f'Set5/LR_bicubic/X4/{image}x4.png')).astype('float32') / 255.)
        gt = cv2.imread(str(world / f'Set5/HR/{image}.png'))
        with torch.no_grad():
            out = tensor2img([qmodel(lq[None])])
        psnrs.append(calculate_psnr(out, gt[:out.shape[0], :out.shape[1]], 4, test_y_channel=True))
    report = json.loads((results / 'oaq_report.json').read_text())
    # Another process may pick another float conv implementation; a last-bit difference can move a value
    # across a rounding boundary of the next layer's quantizer, so agreement is to 0.01 dB, not bit-exact.
    assert sum(psnrs) / len(psnrs) == pytest.approx(report['datasets']['Set5']['quant']['psnr'], abs=0.01)
    assert set(report['datasets']['Set5']['per_image']) == {f'{i}x4' for i in IMAGES}


def test_literal_basicsr_test_py_and_results_archived(plugin_run):
    """``python basicsr/test.py -opt X.yml`` from a BasicSR checkout: the option file alone registers the plugin."""
    world, option_file, results = plugin_run
    import basicsr
    checkout = world / 'basicsr'
    checkout.mkdir(exist_ok=True)
    shutil.copy(Path(basicsr.__file__).parent / 'test.py', checkout / 'test.py')
    # BasicSR master needs no compatibility alias; the released 1.4.2 installed here does, so it is applied
    # first, exactly as master's own import would behave. Nothing else of the plugin is imported beforehand.
    runner = ('import runpy, sys; from oaq_plugin.compat import install_basicsr_compat; install_basicsr_compat(); '
              "assert 'oaq_plugin.basicsr_plugin' not in sys.modules; "
              "sys.argv = ['basicsr/test.py', '-opt', sys.argv[1]]; runpy.run_path('basicsr/test.py', run_name='__main__')")
    result = subprocess.run([sys.executable, '-c', runner, str(option_file)], cwd=world, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (results / 'oaq_report.json').is_file()
    archived = list(results.parent.glob('oaq_srvgg_small_archived_*'))
    assert archived and (archived[0] / 'oaq_report.json').is_file(), 'an earlier results folder must be archived'
    assert (archived[0] / 'run.txt').read_text().startswith('oaq_srvgg_small: W4A4 dual_region/paper')


def test_lmdb_calibration_equals_folder(shared, tmp_path):
    from oaq_plugin.experiment.calibration_data import calibration_source
    from oaq_plugin.config import CalibConfig
    sys.path.insert(0, str(ROOT / 'tools'))
    from make_calib_lmdb import make_lmdb
    folder = tmp_path / 'calib'
    folder.mkdir()
    for path in sorted((shared / 'data/calib/SunHays80/LR_bicubic/X4').glob('*.png'))[:3]:
        shutil.copy(path, folder / path.name)
    make_lmdb(folder, tmp_path / 'calib.lmdb')
    from_folder = calibration_source(CalibConfig(dataroot_lq=str(folder)))
    from_lmdb = calibration_source(CalibConfig(dataroot_lq=str(tmp_path / 'calib.lmdb'), io_backend='lmdb'))
    a = from_folder.batches(2, 2, 24, seed=1)
    b = from_lmdb.batches(2, 2, 24, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cli_reports_bad_option_in_one_line(shared, tmp_path):
    option_file = shared_option_file(shared, tmp_path, 'bad_option', w_bitz=4)
    result = subprocess.run([sys.executable, '-m', 'oaq_plugin.test', '-opt', str(option_file)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "unknown key 'w_bitz' (did you mean 'w_bits'?)" in result.stderr
    assert 'Traceback' not in result.stderr


def test_two_process_run_matches_single_process(plugin_run, shared):
    """``torchrun --nproc_per_node=2 -m oaq_plugin.test --launcher pytorch`` (gloo on the CPU)."""
    world, _, single = plugin_run
    option_file = shared_option_file(shared, world, 'oaq_srvgg_two_processes')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m',
               'oaq_plugin.test', '-opt', str(option_file), '--launcher', 'pytorch']
    result = subprocess.run(command, cwd=world, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((single / 'oaq_report.json').read_text())
    two = json.loads((world / 'results' / 'oaq_srvgg_two_processes' / 'oaq_report.json').read_text())
    assert [row['name'] for row in one['layers']] == [row['name'] for row in two['layers']]
    for a, b in zip(one['layers'], two['layers']):
        for key in ('lower', 'upper', 'breakpoint', 'w_clip'):
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-12), (a['name'], key)
    assert two['datasets']['Set5']['num_images'] == len(IMAGES)
    assert set(two['datasets']['Set5']['per_image']) == set(one['datasets']['Set5']['per_image'])
    for metric, value in one['datasets']['Set5']['fp'].items():
        assert two['datasets']['Set5']['fp'][metric] == pytest.approx(value, abs=1e-9)


def test_run_ends_with_a_summary_and_its_folder(plugin_run):
    world, _, results = plugin_run
    printed = (world / 'plugin_run.out').read_text().strip().splitlines()
    assert printed[-1] == 'results in results/oaq_srvgg_small/'
    assert any(line.startswith('Set5') for line in printed), printed
    # The checks before the run leave BasicSR's logger to the run: its log file holds the run's lines.
    log = next(results.glob('test_oaq_srvgg_small_*.log')).read_text()
    assert 'OAQ: calibrating SRVGGNetCompact on 4 images' in log and 'OAQ results on Set5 (2 images)' in log
    assert (results / 'run.txt').read_text().startswith(
        'oaq_srvgg_small: W4A4 dual_region/paper, protocol full, '
        'stages calibrate+search+reconstruction+distillation, backend fake')
    assert stat.S_IMODE((results / 'oaq_report.json').stat().st_mode) == stat.S_IMODE(
        (results / 'quantized.pth').stat().st_mode)


def test_help_describes_the_plugin_options_without_importing_torch():
    code = ("import sys\nfrom oaq_plugin.cli.basicsr_test import main\ntry:\n    main(['--help'])\n"
            "except SystemExit as done:\n    assert done.code == 0\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'basicsr', 'cv2', 'numpy'))\n"
            "assert not heavy, heavy\n")
    completed = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    for text in ('--force_yml oaq:w_bits=8', 'oaq_plugin/config.py', '--auto_resume', 'oaq_resume_state.pth',
                 '--debug', 'traceback', 'results/<name>/'):
        assert text in completed.stdout, text
    module = subprocess.run([sys.executable, '-m', 'oaq_plugin.test', '--help'], capture_output=True, text=True,
                            timeout=120)
    assert module.returncode == 0 and module.stdout.startswith('usage: python -m oaq_plugin.test')


def _rewrite(option_file: Path, change) -> None:
    text = option_file.read_text()
    options = yaml.load(text, Loader=yaml.UnsafeLoader)
    options.pop('oaq_register')
    change(options)
    option_file.write_text(text.splitlines()[0] + '\n' + yaml.safe_dump(options, sort_keys=False))


@pytest.mark.parametrize('case, message', [
    ('option', "unknown key 'w_bitz' (did you mean 'w_bits'?)"),
    ('calibration', 'does not exist (oaq.calib.dataroot_lq)'),
    ('test set', 'datasets.test_1.dataroot_lq:'),
    ('missing checkpoint', 'does not exist (path.pretrain_network_g)'),
    ('corrupt checkpoint', 'is not a checkpoint'),
    ('other checkpoint', 'does not match SRVGGNetCompact (network_g)'),
])
def test_bad_inputs_are_refused_before_results_are_archived(shared, tmp_path, monkeypatch, capsys, case, message):
    from oaq_plugin.cli.basicsr_test import main
    option_file = shared_option_file(shared, tmp_path, 'refused', **({'w_bitz': 4} if case == 'option' else {}))
    changes = {
        'calibration': lambda o: o['oaq']['calib'].update(dataroot_lq=str(tmp_path / 'no_such_folder')),
        'test set': lambda o: o['datasets']['test_1'].update(dataroot_lq=str(tmp_path / 'no_such_folder')),
        'missing checkpoint': lambda o: o['path'].update(pretrain_network_g=str(tmp_path / 'gone.pth')),
        'corrupt checkpoint': lambda o: o['path'].update(pretrain_network_g=str(tmp_path / 'garbage.pth')),
        'other checkpoint': lambda o: o['path'].update(pretrain_network_g=str(tmp_path / 'other.pth')),
    }
    (tmp_path / 'garbage.pth').write_bytes(b'random bytes, not a checkpoint')
    torch.save({'params': torch.nn.Conv2d(3, 3, 3).state_dict()}, tmp_path / 'other.pth')
    if case in changes:
        _rewrite(option_file, changes[case])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['oaq-test'])
    earlier = tmp_path / 'results' / 'refused'
    earlier.mkdir(parents=True)
    (earlier / 'earlier.txt').write_text('the results of an earlier run')

    assert main(['-opt', str(option_file)]) == 2

    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    assert sorted(p.name for p in (tmp_path / 'results').iterdir()) == ['refused']
    assert sorted(p.name for p in earlier.iterdir()) == ['earlier.txt']


def test_calibration_images_of_a_test_set_are_named(tmp_path, caplog):
    import cv2
    import numpy as np
    from oaq_plugin.basicsr_plugin.oaq_model import test_set_files
    from oaq_plugin.config import CalibConfig
    from oaq_plugin.experiment import warn_if_calibrating_on_test_sets
    rng = np.random.default_rng(0)
    for folder in ('set5/LR', 'set5/HR', 'calib'):
        (tmp_path / folder).mkdir(parents=True)
    for name in ('a', 'b'):
        cv2.imwrite(str(tmp_path / 'set5/LR' / f'{name}.png'), rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        cv2.imwrite(str(tmp_path / 'set5/HR' / f'{name}.png'), rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    shutil.copy(tmp_path / 'set5/LR/b.png', tmp_path / 'calib' / 'copy_of_b.png')
    opt = {'datasets': {'test_1': {'name': 'Set5', 'dataroot_lq': str(tmp_path / 'set5/LR'),
                                   'dataroot_gt': str(tmp_path / 'set5/HR')}}}
    with caplog.at_level('WARNING', logger='oaq_plugin'):
        overlap = warn_if_calibrating_on_test_sets(CalibConfig(dataroot_lq=str(tmp_path / 'calib')), test_set_files(opt))
    assert overlap == {'Set5': 1}
    assert "1 of the calibration images in" in caplog.text and "test set 'Set5'" in caplog.text
