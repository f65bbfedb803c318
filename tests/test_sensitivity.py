"""Per-layer sensitivity analysis, its chart, and the bit allocation built on it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oaq_plugin import OAQConfig
from oaq_plugin.config import AnalysisConfig
from oaq_plugin.pipeline.analysis.sensitivity import (LayerSensitivity, SensitivityReport, allocate_bits, fidelity_pairs,
                                             layer_sensitivity, plot_sensitivity, sensitivity_allocation)
from oaq_plugin.pipeline.metrics.image_quality import psnr_y
from oaq_plugin.quant import quant_layers
from tiny_sr import calibrated_tiny, tiny_images, single_thread  # noqa: F401 (autouse fixture)

TINY_SEARCH = {'num_samples': 2, 'window': 8, 'grid_size': 4, 'refine_rounds': 1}


def test_psnr_matches_basicsr_protocol():
    from basicsr.metrics.psnr_ssim import calculate_psnr
    from basicsr.utils import tensor2img
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 40, 36, generator=generator)
    output = (reference + 0.05 * torch.randn(3, 40, 36, generator=generator)).clamp(-0.1, 1.1)
    expected = calculate_psnr(tensor2img(output[None]), tensor2img(reference[None]), crop_border=4,
                              test_y_channel=True)
    assert psnr_y(output, reference, 4) == pytest.approx(expected, abs=1e-6)
    assert psnr_y(reference, reference, 4) == float('inf')


def hr_pairs(model, count=3):
    """(LR, HR) pairs whose HR is a slightly perturbed float output, so the float PSNR is finite."""
    images = tiny_images(count, size=16, seed=5)
    pairs = fidelity_pairs(model, images)
    return [(lr, (hr + 0.01 * torch.sin(torch.arange(hr.numel()).reshape(hr.shape))).clamp(0, 1))
            for lr, hr in pairs]


def test_one_layer_at_a_time_and_modes_restored():
    model, qmodel, _, _, _ = calibrated_tiny({'search': {'enabled': False}})
    report = layer_sensitivity(qmodel, hr_pairs(model), crop_border=2)
    names = [n for n, _ in quant_layers(qmodel)]
    assert [layer.name for layer in report.layers] == names
    assert all(layer.mode == 'quant' for _, layer in quant_layers(qmodel))
    for layer in report.layers:
        assert layer.drop == pytest.approx(report.float_psnr - layer.psnr)
    # At 2 bits every layer costs more than at its planned width.
    clips = [layer.weight_quantizer.clip.clone() for _, layer in quant_layers(qmodel)]
    low = layer_sensitivity(qmodel, hr_pairs(model), crop_border=2, bits=2)
    assert all(layer.w_bits == 2 and layer.a_bits == 2 for layer in low.layers)
    assert sum(layer.error for layer in low.layers) > sum(layer.error for layer in report.layers)
    # The temporary width change leaves the quantizers as they were.
    assert all(torch.equal(a, layer.weight_quantizer.clip) for a, (_, layer) in zip(clips, quant_layers(qmodel)))
    assert [layer.weight_quantizer.bits for _, layer in quant_layers(qmodel)] == [8, 4, 4, 4, 4, 8]


def test_fidelity_reference_report_is_json_and_ranked():
    model, qmodel, _, _, _ = calibrated_tiny({'search': {'enabled': False}})
    report = layer_sensitivity(qmodel, fidelity_pairs(model, tiny_images(2, size=16)), crop_border=2,
                               reference='fp', bits=3)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data['float_psnr'] is None and data['reference'] == 'fp'
    assert all(layer['drop'] is None for layer in data['layers'])
    ranked = report.ranked()
    assert [layer.error for layer in ranked] == sorted((layer.error for layer in ranked), reverse=True)
    assert 'fidelity' in report.summary()


def test_plot_writes_a_png(tmp_path):
    model, qmodel, _, _, _ = calibrated_tiny({'search': {'enabled': False}})
    report = layer_sensitivity(qmodel, hr_pairs(model, 2), crop_border=2)
    path = plot_sensitivity(report, tmp_path / 'plots' / 'sensitivity.png')
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 2000


def synthetic_reports(errors_by_width, sizes):
    reports = {}
    for width, errors in errors_by_width.items():
        layers = [LayerSensitivity(name=f'l{i}', role='body', w_bits=width, a_bits=width, num_weights=sizes[i],
                                   psnr=30.0, drop=None, error=e) for i, e in enumerate(errors)]
        reports[width] = SensitivityReport(reference='fp', float_psnr=float('inf'), float_mse=0.0, layers=layers)
    return reports


def test_allocation_respects_the_budget_and_favours_sensitive_layers():
    # l0 is very sensitive, l3 barely at all.
    reports = synthetic_reports({3: [50.0, 8.0, 6.0, 0.2], 4: [10.0, 3.0, 2.0, 0.1], 5: [1.0, 1.0, 0.8, 0.05]},
                                sizes=[100, 100, 100, 100])
    allocation = allocate_bits(reports, budget=4.0)
    assert sum(allocation.values()) / 4 <= 4.0
    assert allocation['l0'] == 5 and allocation['l3'] == 3
    total = sum(reports[b].layers[int(n[1])].error for n, b in allocation.items())
    assert total < sum(layer.error for layer in reports[4].layers)
    assert set(allocate_bits(reports, budget=3.0).values()) == {3}
    # Weighting by parameters: an expensive layer is upgraded last.
    weighted = allocate_bits(synthetic_reports({3: [9.0, 9.0], 4: [1.0, 1.0]}, sizes=[1000, 10]), budget=3.5)
    assert weighted == {'l0': 3, 'l1': 4}


def test_allocation_against_uniform_end_to_end():
    model, _, source, _, batches = calibrated_tiny()
    config = OAQConfig.from_dict({'search': TINY_SEARCH, 'reconstruction': {'enabled': False},
                                  'distillation': {'enabled': False}})
    holdout = tiny_images(2, size=16, seed=9)
    result = sensitivity_allocation(model, batches, holdout, config, crop_border=2,
                                    analysis=AnalysisConfig(allocation_offsets=[-1, 0, 1]))
    assert set(result.allocation) == {'block1.conv1', 'block1.conv2', 'block2.conv1', 'block2.conv2'}
    assert set(result.allocation.values()) <= {3, 4, 5}
    assert result.average_bits <= 4.0 + 1e-9
    assert np.isfinite(result.uniform_psnr) and np.isfinite(result.allocated_psnr)
    assert json.loads(json.dumps(result.to_dict()))['budget'] == 4.0


@pytest.mark.slow
def test_real_checkpoint_sensitivity(shared, tmp_path):
    from oaq_plugin.archs.zoo import build_zoo_model
    from oaq_plugin.pipeline.stages.calibrate import calibrate
    from oaq_plugin.quant.convert import convert
    from tiny_sr import calibration_crops
    model = build_zoo_model('imdn_x4', shared)
    batch = calibration_crops(shared, count=3, size=32)
    config = OAQConfig.from_dict({'search': {'enabled': False}})
    qmodel = convert(model, config, batch[:1])
    calibrate(qmodel, [batch[:2]], config)
    names = ['fea_conv', 'IMDB1.c1', 'LR_conv', 'upsampler.0']
    # The held-out crop is not one of the calibration crops; the reference is the float output.
    report = layer_sensitivity(qmodel, fidelity_pairs(model, [batch[2]]), 4, reference='fp', bits=4, names=names)
    assert [layer.name for layer in report.layers] == names
    assert all(layer.error > 0 for layer in report.layers)
    assert plot_sensitivity(report, tmp_path / 'imdn.png').stat().st_size > 2000
