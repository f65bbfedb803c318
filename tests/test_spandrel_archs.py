"""Generality: small random instances of ten spandrel architectures, each through ``oaq quantize`` at W8A8.

Each must quantize, validate and export (``quantized.pth`` rebuilt by ``oaq_plugin.load_quantized``
reproduces the reported fidelity exactly), stay close to its float output, and list every layer it
leaves in float with the reason.

The threshold: at W8A8 the ten instances measured 49.9 (SAFMN) to 68.1 dB (Compact) fidelity PSNR
(quantized vs float output, Y channel, uint8) with the default recipe, and 37.0 to 59.5 dB at W4A4
(docs/BENCHMARKS.md, "Any checkpoint"). 40 dB, an RMS difference of 2.5 grey levels of 255, keeps a
10 dB margin below every W8A8 measurement (random weights, thread counts) and is still above the
worst W4A4 result, so a W8A8 run that degrades to 4-bit quality fails.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from spandrel_tiny import CASES, save_random_instance, write_image_world
from tiny_sr import single_thread  # noqa: F401 - autouse: one torch thread, as on a busy machine

import oaq_plugin
from oaq_plugin.cli.main import main
from oaq_plugin.loading import load_sr_model
from oaq_plugin.pipeline.inference import run_tiled
from oaq_plugin.pipeline.io.images import read_image
from oaq_plugin.pipeline.metrics.image_quality import psnr, tensor_to_uint8

W8A8_FIDELITY_DB = 40.0
# Layers that compute with their own parameters; a norm is recognised by its class name too (custom norms).
COMPUTING_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.LayerNorm, nn.GroupNorm,
                    nn.BatchNorm2d, nn.InstanceNorm2d, nn.PReLU)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('spandrel_world')
    return root, write_image_world(root)


def _quantize(world, case: str, bits: str = 'w8a8') -> Path:
    root, folders = world
    checkpoint = save_random_instance(case, root)
    out = root / 'results' / f'{case}_{bits}'
    code = main(['quantize', str(checkpoint), '--calib', str(folders['calib']), '--bits', bits, '--quiet',
                 '--test', f"Tiny={folders['hr']}:{folders['lr']}", '--out', str(out), '--backend', 'reference',
                 '--set', 'calib.num_batches=2', '--set', 'calib.batch_size=2', '--set', 'calib.patch_size=24',
                 # Every stage of the default recipe runs; block reconstruction and distillation briefly, to bound
                 # the suite's time.
                 '--set', 'reconstruction.iterations=25', '--set', 'distillation.iterations=25'])
    assert code == 0
    return out


def _is_custom_norm(module: nn.Module) -> bool:
    return re.search(r'Norm(\dd)?$', type(module).__name__) is not None and not isinstance(module, COMPUTING_LAYERS)


def _running_layers(model: nn.Module, image: torch.Tensor) -> set:
    """Names of the modules of COMPUTING_LAYERS (and of classes named ``*Norm``/``*Norm2d``) that run on ``image``."""
    ran, handles = set(), []
    for name, module in model.named_modules():
        if isinstance(module, COMPUTING_LAYERS) or _is_custom_norm(module):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: ran.add(name)))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return ran


@pytest.mark.parametrize('case', sorted(CASES))
def test_quantize_run_export_at_w8a8(world, case):
    out = _quantize(world, case)
    report = json.loads((out / 'oaq_report.json').read_text())
    assert report['model']['architecture'] == CASES[case][0] and report['model']['scale'] == 2
    tiny = report['datasets']['Tiny']
    assert tiny['num_images'] == 2
    assert tiny['fidelity_psnr'] >= W8A8_FIDELITY_DB, f"{case}: {tiny['fidelity_psnr']:.2f} dB"
    assert all(row['w_bits'] in (8, None) and row['a_bits'] == 8 for row in report['layers'])

    # Export: the rebuilt network, on the run's backend, reproduces the reported per-image fidelity exactly.
    qmodel = oaq_plugin.to_backend(oaq_plugin.load_quantized(out / 'quantized.pth'), 'reference')
    float_model = load_sr_model(world[0] / f'{case}.pth')
    lr_path = sorted(world[1]['lr'].glob('*.png'))[0]
    lr = read_image(lr_path)[None]
    with torch.no_grad():
        fp = tensor_to_uint8(run_tiled(float_model.module, lr, 2, 0, 0, float_model.size_multiple))
        quant = tensor_to_uint8(run_tiled(qmodel, lr, 2, 0, 0, float_model.size_multiple))
    assert psnr(quant, fp, 2) == pytest.approx(tiny['per_image'][lr_path.stem]['fidelity_psnr'], abs=1e-9)

    # Every computing layer that runs is quantized or listed in float_ops with a reason.
    quantized = {row['name'] for row in report['layers']}
    folded = set((report.get('batchnorm_folds') or {}).values())  # batch norms folded into their convs
    listed = {op['name']: op for op in report.get('float_ops') or []}
    assert all(op.get('reason') for op in listed.values())
    ran = _running_layers(float_model.module, lr)
    unaccounted = sorted(name for name in ran if name not in quantized | folded | set(listed))
    assert not unaccounted, f'{case}: layers left in float without a float_ops entry: {unaccounted[:5]}'
