"""The one run every entry point shares (``oaq_plugin.experiment``), and what ``quantize()`` takes and refuses."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from oaq_plugin import ConfigError, DataError, Interrupted, OAQConfig, OAQOptions, quantize, run_pipeline
from oaq_plugin.experiment import (CROPS_DIR, HISTOGRAM_FILE, QUANTIZED_FILE, REPORT_FILE, RUN_NOTE_FILE,
                                   SENSITIVITY_FILE, TestSet, calibration_source, run_experiment,
                                   warn_if_calibrating_on_test_sets)
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.pipeline.resume import StopRequest, load_state
from tiny_sr import TinyResSR, single_thread, tiny_images  # noqa: F401 (autouse fixture)

IMAGES = ('a', 'b')
SMALL = {'search': {'enabled': False}, 'reconstruction': {'enabled': False}, 'distillation': {'enabled': False},
         'calib': {'num_batches': 2, 'batch_size': 2, 'patch_size': 12},
         'backend': 'fake'}


def _write(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype(np.uint8)
    cv2.imwrite(str(path), array)


@pytest.fixture
def world(tmp_path):
    """A x2 test set (HR 32x32, LR 16x16, ``<name>x2`` LR names) and four LR calibration images."""
    for index, name in enumerate(IMAGES):
        hr = tiny_images(1, size=32, seed=10 + index)[0]
        _write(tmp_path / 'test/HR' / f'{name}.png', hr)
        _write(tmp_path / 'test/LR' / f'{name}x2.png', torch.nn.functional.avg_pool2d(hr[None], 2)[0])
    for index, image in enumerate(tiny_images(4, size=24, seed=3)):
        _write(tmp_path / 'calib' / f'c{index}.png', image)
    return tmp_path


def _test_set(root: Path) -> TestSet:
    pairs = [(root / 'test/LR' / f'{name}x2.png', root / 'test/HR' / f'{name}.png') for name in IMAGES]
    return TestSet('Tiny', root / 'test/LR', root / 'test/HR', pairs)


def _options(root: Path, **changes) -> dict:
    section = {**SMALL, 'calib': {**SMALL['calib'], 'dataroot_lq': str(root / 'calib')}}
    section.update(changes)
    return section


def _run(root: Path, out: Path, section: dict, **kwargs):
    torch.manual_seed(0)
    options = OAQOptions.from_dict(section)
    source = calibration_source(options.method.calib)
    return run_experiment(TinyResSR().eval(), source, [_test_set(root)], options, out, scale=2, progress=False,
                          **kwargs)


def test_run_writes_every_artifact_once_named(world):
    out = world / 'results' / 'tiny'
    previous = os.umask(0o022)
    try:
        result = _run(world, out, _options(world, analysis={'layer_sensitivity': True, 'num_images': 1}))
    finally:
        os.umask(previous)
    for name in (REPORT_FILE, QUANTIZED_FILE, HISTOGRAM_FILE, SENSITIVITY_FILE, RUN_NOTE_FILE):
        assert (out / name).is_file(), name
    # Every artifact is readable by others, the report included (it was written private, 0600).
    assert stat.S_IMODE((out / REPORT_FILE).stat().st_mode) == 0o644
    assert stat.S_IMODE((out / QUANTIZED_FILE).stat().st_mode) == 0o644
    assert sorted(p.stem for p in (out / CROPS_DIR / 'Tiny').glob('*.png')) == [f'{n}x2' for n in IMAGES]
    report = json.loads((out / REPORT_FILE).read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report['config'] == OAQConfig.from_dict({k: v for k, v in _options(world).items() if k != 'backend'}).to_dict()
    assert report['run_options']['backend'] == 'fake' and set(report['backend'].values()) == {'fake'}
    tiny = report['datasets']['Tiny']
    assert tiny['num_images'] == 2 and set(tiny['per_image']) == {f'{n}x2' for n in IMAGES}
    assert set(tiny['fp']) == set(tiny['quant']) == {'psnr', 'ssim'}
    assert tiny['quant']['psnr'] != tiny['fp']['psnr'] and tiny['fidelity_psnr'] > 20 and tiny['delta_e'] > 0
    assert tiny['fp']['psnr'] == pytest.approx(np.mean([v['fp_psnr'] for v in tiny['per_image'].values()]))
    assert {row['name'] for row in report['layer_sensitivity']['layers']} == {row['name'] for row in report['layers']}
    note = (out / RUN_NOTE_FILE).read_text()
    assert note.startswith('tiny: W4A4 dual_region/paper, protocol full, stages calibrate, backend fake')


def test_everything_is_checked_before_the_results_folder_is_touched(world):
    out = world / 'results' / 'tiny'
    out.mkdir(parents=True)
    (out / 'earlier.txt').write_text('an earlier run')
    missing = _test_set(world)
    missing.pairs.append((world / 'test/LR/gonex2.png', None))
    source = calibration_source(OAQOptions.from_dict(_options(world)).method.calib)
    with pytest.raises(DataError, match='gonex2.png does not exist'):
        run_experiment(TinyResSR().eval(), source, [missing], _options(world), out, scale=2, progress=False)
    with pytest.raises(ConfigError, match="unknown key 'w_bitz'"):
        run_experiment(TinyResSR().eval(), source, [_test_set(world)], _options(world, w_bitz=3), out, scale=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ['tiny'] and (out / 'earlier.txt').is_file()
    # A good run archives the earlier folder, which still says what it held.
    _run(world, out, _options(world))
    archived = [p for p in out.parent.iterdir() if p.name.startswith('tiny_archived_')]
    assert len(archived) == 1 and (archived[0] / 'earlier.txt').is_file()
    assert (out / REPORT_FILE).is_file() and not (out / 'earlier.txt').exists()


def test_tile_option_runs_the_networks_tile_by_tile(world):
    whole = _run(world, world / 'whole', _options(world)).report['datasets']['Tiny']['per_image']
    # With a context wider than the receptive field (6 LR pixels), tiles reproduce the whole image...
    padded = _run(world, world / 'padded', _options(world, tile={'size': 8, 'pad': 8})).report
    # ...without context, the tile borders show: the option is not ignored.
    bare = _run(world, world / 'bare', _options(world, tile={'size': 8, 'pad': 0})).report
    for image, values in whole.items():
        assert padded['datasets']['Tiny']['per_image'][image]['fp_psnr'] == pytest.approx(values['fp_psnr'], abs=1e-4)
        assert abs(bare['datasets']['Tiny']['per_image'][image]['fp_psnr'] - values['fp_psnr']) > 1e-3
    assert padded['run_options']['tile'] == {'size': 8, 'pad': 8}


def test_calibrating_on_a_test_set_warns_naming_it(world, caplog):
    calib = world / 'calib_from_test'
    calib.mkdir()
    shutil.copy(world / 'test/LR/ax2.png', calib / 'renamed.png')
    shutil.copy(world / 'calib/c0.png', calib / 'c0.png')
    options = OAQOptions.from_dict(_options(world, calib={'dataroot_lq': str(calib)}))
    assert warn_if_calibrating_on_test_sets(options.method.calib, {'Other': [world / 'calib/c1.png']}) == {}
    with caplog.at_level(logging.WARNING, logger='oaq_plugin'):
        source = calibration_source(options.method.calib)
        run_experiment(TinyResSR().eval(), source, [_test_set(world)], options, world / 'out', scale=2,
                       progress=False)
    warnings = [r.getMessage() for r in caplog.records if 'calibration images' in r.getMessage()]
    assert len(warnings) == 1 and "test set 'Tiny'" in warnings[0] and warnings[0].startswith('OAQ: 1 of')


def test_a_run_resumes_with_other_run_options(world):
    """The state is checked against the method's config only: backend, tiles and analyses may change."""
    finetune = {'enabled': True, 'epochs': 1, 'iters_per_epoch': 2, 'batch_size': 1, 'patch_size': 12,
                'tap_samples': 1}
    options = OAQOptions.from_dict(_options(world, finetune=finetune))
    source = calibration_source(options.method.calib)
    batches = source.batches(2, 2, 12, 0)
    state = world / 'state' / 'oaq_resume_state.pth'
    stop = StopRequest()
    stop.set()
    torch.manual_seed(0)
    model = TinyResSR().eval()
    with pytest.raises(Interrupted):
        run_pipeline(model, batches, options.method, state_path=state, stop=stop)
    assert set(load_state(state)['options']) == set(OAQConfig().to_dict())
    changed = _options(world, finetune=finetune, backend='reference', tile={'size': 8})
    result = run_experiment(model, source, [_test_set(world)], changed, world / 'out', scale=2, progress=False,
                            state_path=state, resume=True)
    assert not state.exists() and result.report['finetune'] is not None
    assert set(result.report['backend'].values()) == {'reference'}


# -- quantize(): the method's config only ---------------------------------------------------------------
@pytest.mark.parametrize('key, value', [('backend', 'fake'), ('kernel', 'fake'), ('tile', {'size': 64}),
                                        ('resume', True), ('analysis', {'layer_sensitivity': True})])
def test_quantize_refuses_run_options_naming_them(key, value):
    batches = PatchSource(tiny_images(2)).batches(1, 2, 12, 0)
    with pytest.raises(ConfigError, match=rf"oaq\.{key} is a run option .*quantize\(\) takes"):
        quantize(TinyResSR().eval(), batches, {key: value, 'search': {'enabled': False}})


def test_quantize_refuses_a_calibration_folder_it_would_not_read(tmp_path):
    with pytest.raises(ConfigError, match=r'does not read\s+oaq\.calib\.dataroot_lq'):
        quantize(TinyResSR().eval(), [torch.rand(1, 3, 12, 12)], {'calib': {'dataroot_lq': str(tmp_path)}})


def test_quantize_shows_progress_by_default_and_can_be_silenced(capfd):
    batches = PatchSource(tiny_images(2)).batches(2, 2, 12, 0)
    config = OAQConfig(search={'enabled': False}, reconstruction={'enabled': False},
                       distillation={'enabled': False})
    quantize(TinyResSR().eval(), batches, config)
    assert 'calibrate' in capfd.readouterr().err
    quantize(TinyResSR().eval(), batches, config, progress=False)
    assert 'calibrate' not in capfd.readouterr().err
