"""A spandrel checkpoint through BasicSR: ``network_g: {type: Spandrel}`` with the file in
``path.pretrain_network_g``, tested by ``python -m oaq_plugin.test`` (OAQModel) as a BasicSR user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from spandrel_tiny import save_random_instance, write_image_world
from tiny_sr import single_thread  # noqa: F401 - autouse: one torch thread, as on a busy machine

import oaq_plugin


def _option_file(root, folders, checkpoint, name):
    options = {
        'name': name, 'model_type': 'OAQModel', 'scale': 2, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'test_1': {'name': 'Tiny', 'type': 'PairedImageDataset', 'dataroot_gt': str(folders['hr']),
                                'dataroot_lq': str(folders['lr']), 'filename_tmpl': '{}x2',
                                'io_backend': {'type': 'disk'}}},
        'network_g': {'type': 'Spandrel'},
        'path': {'pretrain_network_g': str(checkpoint), 'strict_load_g': True},
        'val': {'save_img': False, 'pbar': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': True}}},
        'oaq': {'w_bits': 8, 'a_bits': 8, 'backend': 'fake', 'search': {'enabled': False},
                'reconstruction': {'enabled': False}, 'distillation': {'enabled': False},
                'calib': {'dataroot_lq': str(folders['calib']), 'num_batches': 2, 'batch_size': 2, 'patch_size': 24}},
    }
    path = root / f'{name}.yml'
    path.write_text('oaq_register: !!python/name:oaq_plugin.register\n' + yaml.safe_dump(options, sort_keys=False))
    return path


def test_option_file_names_only_the_checkpoint(tmp_path):
    folders = write_image_world(tmp_path)
    checkpoint = save_random_instance('rcan', tmp_path)
    option_file = _option_file(tmp_path, folders, checkpoint, 'spandrel_rcan')
    result = subprocess.run([sys.executable, '-m', 'oaq_plugin.test', '-opt', str(option_file)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / 'results' / 'spandrel_rcan'
    report = json.loads((out / 'oaq_report.json').read_text())
    page = (out / 'report.html').read_text()  # written beside the report by every entry point
    assert '<h2>Summary</h2>' in page and '<td class="text">Tiny</td>' in page
    assert '<h2>Crops</h2>' in page and page.count('data:image/png;base64,') >= 3
    assert report['network_g'] == {'type': 'Spandrel', 'checkpoint': str(checkpoint), 'scale': 2}
    tiny = report['datasets']['Tiny']
    assert tiny['num_images'] == 2 and tiny['fidelity_psnr'] > 40
    assert abs(tiny['fp']['psnr'] - tiny['quant']['psnr']) < 0.1
    # The stored network_g rebuilds the float skeleton from the same file.
    qmodel = oaq_plugin.load_quantized(out / 'quantized.pth')
    assert type(qmodel).__name__ == 'RCAN'


def test_not_a_checkpoint_is_one_line(tmp_path):
    folders = write_image_world(tmp_path, calib_images=2, test_images=1)
    junk = tmp_path / 'model.pth'
    junk.write_bytes(os.urandom(3000))
    option_file = _option_file(tmp_path, folders, junk, 'spandrel_junk')
    result = subprocess.run([sys.executable, '-m', 'oaq_plugin.test', '-opt', str(option_file)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if 'oaq_plugin' in line and 'error' in line]
    assert len(lines) == 1 and 'is not a checkpoint' in lines[0] and 'weights_only' not in result.stderr
    assert not (tmp_path / 'results' / 'spandrel_junk').exists()
