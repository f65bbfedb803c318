"""Sensitivity-aware finetuning on a tiny residual SR network: schedule, determinism, loss, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oaq_plugin import NumericalError, OAQConfig
from oaq_plugin.pipeline.capture.feature_taps import FeatureTaps, detect_blocks
from oaq_plugin.pipeline.stages.finetune import finetune, parameter_groups, sensitivity_loss, tap_weights
from oaq_plugin.quant.fast_fake_quant import fast_quantize
from oaq_plugin.quant import DualRegionQuantizer, UniformQuantizer, quant_layers
from oaq_plugin.pipeline.io.patches import PatchSource
from tiny_sr import TinyResSR, calibrated_tiny, single_thread  # noqa: F401 (autouse fixture)


def make_setup(seed=0, **finetune):
    options = {'search': {'enabled': False},
               'finetune': {'enabled': True, 'epochs': 3, 'iters_per_epoch': 4, 'batch_size': 2, 'patch_size': 12,
                            'tap_samples': 4, **finetune}}
    model, qmodel, source, config, _ = calibrated_tiny(options, seed)
    return model, qmodel, source, config


def snapshot(qmodel):
    return {group: [p.detach().clone() for _, p in params] for group, params in parameter_groups(qmodel).items()}


def changed(before, after):
    return {group: any(not torch.equal(a, b) for a, b in zip(before[group], after[group])) for group in before}


def eval_loss(model, qmodel, config, batches):
    settings = config.finetune
    names = detect_blocks(model, batches[0][:1])
    fp_taps, q_taps = FeatureTaps(model, names, 'output'), FeatureTaps(qmodel, names, 'output')
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            target = model(batch) * 255
            output = qmodel(batch) * 255
            keys = sorted(fp_taps.features)
            weights = torch.full((len(keys),), 1.0 / len(keys))
            sen = sensitivity_loss(fp_taps.features, q_taps.features, keys, weights)
            total += float(settings.sen_weight * sen + settings.rec_weight * (output - target).abs().mean())
            fp_taps.clear()
            q_taps.clear()
    fp_taps.remove()
    q_taps.remove()
    return total / len(batches)


def test_blocks_are_detected_as_taps():
    model = TinyResSR()
    assert detect_blocks(model, torch.rand(1, 3, 8, 8)) == ['block1', 'block2']


def test_finetuning_decreases_the_loss():
    model, qmodel, source, config = make_setup(epochs=3, iters_per_epoch=6, lr=1e-2)
    # Start away from the calibrated optimum, so that a few iterations show the direction of the gradients.
    with torch.no_grad():
        for _, layer in quant_layers(qmodel):
            layer.weight_quantizer.clip.mul_(0.5)
            layer.act_quantizer.upper.mul_(0.5)
    held = PatchSource.batches(source, 3, 4, 12, seed=99)
    before = eval_loss(model, qmodel, config, held)
    report = finetune(model, qmodel, source, config)
    after = eval_loss(model, qmodel, config, held)
    assert after < before
    assert report.iterations == 18 and len(report.epochs) == 3


def test_deterministic_for_a_seed():
    model, qmodel, source, config = make_setup()
    other = copy.deepcopy(qmodel)
    finetune(model, qmodel, source, config)
    finetune(model, other, source, config)
    for (_, a), (_, b) in zip(qmodel.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b)
    assert torch.equal(qmodel(torch.ones(1, 3, 8, 8)), other(torch.ones(1, 3, 8, 8)))


def test_each_epoch_trains_only_its_group():
    model, qmodel, source, _ = make_setup()
    start = snapshot(qmodel)
    runs = {}
    for epochs in (1, 2, 3):
        config = OAQConfig.from_dict({'finetune': {'enabled': True, 'epochs': epochs, 'iters_per_epoch': 3,
                                                   'batch_size': 2, 'patch_size': 12, 'tap_samples': 4,
                                                   'lr': 1e-2}})
        q = copy.deepcopy(qmodel)
        finetune(model, q, source, config)
        runs[epochs] = snapshot(q)
    assert changed(start, runs[1]) == {'weight_clip': True, 'act_bounds': False, 'breakpoint': False}
    assert changed(runs[1], runs[2]) == {'weight_clip': False, 'act_bounds': True, 'breakpoint': False}
    assert changed(runs[2], runs[3]) == {'weight_clip': False, 'act_bounds': False, 'breakpoint': True}
    # Nothing stays trainable after finetuning.
    assert not any(p.requires_grad for p in qmodel.parameters())


def test_learning_rate_decays_per_group_after_its_epochs():
    model, qmodel, source, config = make_setup(epochs=7, iters_per_epoch=1, lr=1e-3, lr_decay=0.5)
    report = finetune(model, qmodel, source, config)
    groups = [e.group for e in report.epochs]
    assert groups == ['weight_clip', 'act_bounds', 'breakpoint'] * 2 + ['weight_clip']
    lrs = [e.lr for e in report.epochs]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4])


def test_tap_weights_sum_to_one_and_temperature_flattens():
    stds = [1.0, 3.0, 12.0]
    sharp = tap_weights(stds, 1.0, 'sensitivity')
    flat = tap_weights(stds, 100.0, 'sensitivity')
    assert float(sharp.sum()) == pytest.approx(1.0) and float(flat.sum()) == pytest.approx(1.0)
    assert int(sharp.argmax()) == 2
    assert float(flat.max()) < float(sharp.max()) and float(flat.min()) > float(sharp.min())
    assert torch.allclose(tap_weights(stds, 1.0, 'vanilla'), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_report_logs_tap_weights_and_vanilla_is_uniform():
    model, qmodel, source, config = make_setup(epochs=1, iters_per_epoch=1)
    report = finetune(model, copy.deepcopy(qmodel), source, config)
    assert report.taps == ['block1', 'block2'] and report.tap_kind == 'blocks'
    assert sum(report.tap_weights) == pytest.approx(1.0)
    assert report.tap_stds[0] != report.tap_stds[1]
    vanilla = OAQConfig.from_dict({**config.to_dict(), 'finetune': {**config.to_dict()['finetune'], 'mode': 'vanilla'}})
    report = finetune(model, copy.deepcopy(qmodel), source, vanilla)
    assert report.tap_weights == pytest.approx([0.5, 0.5])
    data = report.to_dict()
    assert data['mode'] == 'vanilla' and len(data['epochs']) == 1


def test_layer_taps_use_quantized_layer_inputs():
    model, qmodel, source, config = make_setup(epochs=1, iters_per_epoch=1, taps='layers')
    report = finetune(model, qmodel, source, config)
    assert report.tap_kind == 'layers'
    assert report.taps == ['head', 'block1.conv1', 'block1.conv2', 'block2.conv1', 'block2.conv2', 'up']


def test_nan_stops_with_numerical_error_naming_the_layer():
    model, qmodel, source, config = make_setup(epochs=1, iters_per_epoch=2)
    with torch.no_grad():
        qmodel.block2.conv1.weight_quantizer.clip.fill_(float('nan'))
    with pytest.raises(NumericalError, match='block2.conv1'):
        finetune(model, qmodel, source, config)


def _quantizer(kind, lower, upper, bp_ratio, levels, bits):
    if kind == 'uniform':
        q = UniformQuantizer(bits)
    else:
        q = DualRegionQuantizer(bits, levels=levels)
        q.set_breakpoint(bp_ratio * max(abs(lower), abs(upper)))
    q.set_bounds(lower, upper)
    for p in q.parameters():
        p.requires_grad_(True)
    return q


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(['dual', 'uniform']), lower=st.floats(-50, 0.5), width=st.floats(0.5, 80),
       bp_ratio=st.floats(0.02, 1.2), levels=st.sampled_from(['paper', 'pwlq']), bits=st.integers(2, 8),
       seed=st.integers(0, 10))
def test_fast_fake_quant_matches_reference_values_and_gradients(kind, lower, width, bp_ratio, levels, bits, seed):
    q = _quantizer(kind, lower, lower + width, bp_ratio, levels, bits)
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(4000, generator=generator) ** 3 * width / 6 + lower + width / 3).requires_grad_(True)
    g = torch.randn(4000, generator=generator)
    reference = q(x)
    (reference * g).sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros(()) for p in q.parameters()]
    x.grad = None
    q.zero_grad()
    fast = fast_quantize(q.grid(), x)
    (fast * g).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros(()) for p in q.parameters()]
    # Equal up to float rounding (a value within an ulp of a rounding boundary may round the other way).
    assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-5 * width)
    # The reference's input gradient is (1/step) * step, one ulp from 1; here it is exactly 1.
    assert torch.allclose(grads[0], ref_grads[0], rtol=1e-6, atol=0)
    scale = float(g.abs().sum()) * width * 1e-6
    for new, ref in zip(grads[1:], ref_grads[1:]):
        assert torch.allclose(new, ref, rtol=1e-4, atol=scale)


@pytest.mark.slow
def test_real_checkpoint_finetunes_with_block_taps(shared):
    from oaq_plugin.archs.zoo import build_zoo_model
    from oaq_plugin.pipeline.stages.calibrate import calibrate
    from oaq_plugin.quant.convert import convert
    from tiny_sr import calibration_crops
    model = build_zoo_model('imdn_x4', shared)
    batch = calibration_crops(shared, count=2, size=24)
    config = OAQConfig.from_dict({'finetune': {'enabled': True, 'epochs': 1, 'iters_per_epoch': 2, 'batch_size': 1,
                                               'patch_size': 24, 'tap_samples': 2}})
    qmodel = convert(model, config, batch[:1])
    calibrate(qmodel, [batch], config)
    before = snapshot(qmodel)
    report = finetune(model, qmodel, PatchSource(list(batch)), config)
    assert report.taps == [f'IMDB{i}' for i in range(1, 7)] and report.tap_kind == 'blocks'
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in report.epochs)
    assert changed(before, snapshot(qmodel))['weight_clip']
