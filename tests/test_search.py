"""The search stage: never worse than the initialization, moves the breakpoint on heavy tails, reports."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from oaq_plugin import OAQConfig, run_pipeline
from oaq_plugin.pipeline.stages.calibrate import calibrate
from oaq_plugin.pipeline.capture.layer_capture import capture_windows
from oaq_plugin.pipeline.stages.search import LayerProblem, minimize_scalar, search
from oaq_plugin.quant import DualRegionQuantizer, quant_layers, set_mode
from oaq_plugin.quant.convert import convert
from oaq_plugin.quant.fast_fake_quant import lookup_quantizer
from tiny_sr import calibrated_tiny, single_thread  # noqa: F401 (autouse fixture)

SMALL = {'num_samples': 4, 'window': 8, 'grid_size': 6, 'refine_rounds': 2}


class OneConv(nn.Module):
    """A single body conv between two float-kept ends, so the searched layer sees the raw input."""

    def __init__(self, channels=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def heavy_tailed_batches(seed, channels=6, skew=0.0, count=2, dof=4):
    """Student-t samples (``dof`` degrees of freedom): heavy tails, on which the 99th percentile puts the
    breakpoint too far out for the dense region's few levels."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        normal = torch.randn(4, channels, 16, 16, generator=generator)
        chi2 = torch.randn(4, channels, 16, 16, dof, generator=generator).pow(2).sum(-1)
        batches.append(normal / (chi2 / dof).sqrt() + skew)
    return batches


def one_conv_setup(seed=0, skew=0.0, search_options=None):
    model = OneConv(seed=seed).eval()
    config = OAQConfig.from_dict({'layer_bits': {'conv': 4}, 'search': {**SMALL, **(search_options or {})}})
    batches = heavy_tailed_batches(seed, skew=skew)
    qmodel = convert(model, config, batches[0][:1])
    calibrate(qmodel, batches, config)
    return model, qmodel, config, batches


def layer_errors(qmodel, config, batches):
    """Each layer's output error on the windows the search captures (float inputs)."""
    from oaq_plugin.pipeline.capture.layer_capture import first_samples
    samples = first_samples(batches, config.search.num_samples)
    names = [n for n, _ in quant_layers(qmodel)]
    set_mode(qmodel, 'float')
    captured = capture_windows(qmodel, samples, names, config.search.window, config.search.seed)
    set_mode(qmodel, 'quant')
    layers = dict(quant_layers(qmodel))
    with torch.no_grad():
        return {n: LayerProblem(layers[n], captured[n], captured[n]).error() for n in names}


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), skew=st.floats(-3, 3), level_split=st.booleans())
def test_search_never_increases_the_layer_output_error(seed, skew, level_split):
    _, qmodel, config, batches = one_conv_setup(seed, skew, {'level_split': level_split})
    before = layer_errors(qmodel, config, batches)
    report = search(qmodel, batches, config)
    after = layer_errors(qmodel, config, batches)
    for name in before:
        assert after[name] <= before[name] * (1 + 1e-6)
    for layer in report.layers:
        assert layer.error_searched <= layer.error_initial
        assert layer.error_initial == pytest.approx(before[layer.name], rel=1e-5)
    quantizer = qmodel.conv.act_quantizer
    assert quantizer.grid().num_codes == 2 ** quantizer.bits


def test_heavy_tails_move_the_breakpoint_and_lower_the_error():
    _, qmodel, config, batches = one_conv_setup(seed=3, search_options={'act_clip': False, 'weight_clip': False})
    initial_bp = float(qmodel.conv.act_quantizer.breakpoint)
    report = search(qmodel, batches, config)
    layer = report.layers[0]
    assert layer.initial['breakpoint'] == pytest.approx(initial_bp)
    assert layer.searched['breakpoint'] == pytest.approx(float(qmodel.conv.act_quantizer.breakpoint))
    assert abs(layer.searched['breakpoint'] - initial_bp) > 0.05 * initial_bp
    assert layer.error_searched < 0.9 * layer.error_initial


@pytest.mark.parametrize('skew', [2.5, -2.5])
def test_center_search_moves_the_dense_region_on_skewed_inputs(skew):
    _, qmodel, config, batches = one_conv_setup(seed=5, skew=skew, search_options={'center': True,
                                                                                   'weight_clip': False})
    before = layer_errors(qmodel, config, batches)['conv']
    report = search(qmodel, batches, config)
    center = float(qmodel.conv.act_quantizer.dense_center)
    assert report.layers[0].searched['dense_center'] == pytest.approx(center)
    assert center * skew > 0
    assert layer_errors(qmodel, config, batches)['conv'] <= before * (1 + 1e-6)


def test_search_disabled_keeps_the_percentile_initialization():
    model = OneConv().eval()
    batches = heavy_tailed_batches(0)
    base = {'layer_bits': {'conv': 4}, 'search': {**SMALL}, 'reconstruction': {'enabled': False},
            'distillation': {'enabled': False}}
    plain = run_pipeline(model, batches, {**base, 'search': {**SMALL, 'enabled': False}})
    searched = run_pipeline(model, batches, base)
    assert 'search' not in plain.reports and 'search' in searched.reports
    reference = convert(model, OAQConfig.from_dict(base), batches[0][:1])
    calibrate(reference, batches, OAQConfig.from_dict(base))
    assert float(plain.model.conv.act_quantizer.breakpoint) == float(reference.conv.act_quantizer.breakpoint)
    assert torch.equal(plain.model.conv.weight_quantizer.clip, reference.conv.weight_quantizer.clip)


def test_report_lists_initial_and_searched_values_and_is_json():
    _, qmodel, source, config, batches = calibrated_tiny({'search': SMALL})
    report = search(qmodel, batches, config)
    data = json.loads(json.dumps(report.to_dict()))
    names = [layer['name'] for layer in data['layers']]
    assert names == ['head', 'block1.conv1', 'block1.conv2', 'block2.conv1', 'block2.conv2', 'up']
    for layer in data['layers']:
        for key in ('breakpoint', 'lower', 'upper', 'weight_clip_mean'):
            assert key in layer['initial'] and key in layer['searched']
        assert 0.0 <= layer['error_reduction'] <= 1.0
    assert data['relative_error_searched'] <= data['relative_error_initial']
    assert 'search:' in report.summary()


def test_memory_groups_do_not_change_the_result(monkeypatch):
    _, qmodel, _, config, batches = calibrated_tiny({'search': SMALL})
    other = copy.deepcopy(qmodel)
    search(qmodel, batches, config)
    small_budget = config.replace(search=type(config.search)(**{**config.search.__dict__, 'memory_mb': 16}))
    # A budget below one layer's capture makes one group per layer.
    from oaq_plugin.pipeline.capture import layer_capture
    original = layer_capture.split_by_budget
    groups_seen = []

    def spy(names, sizes, budget):
        groups = original(names, sizes, 1)
        groups_seen.append(len(groups))
        return groups
    monkeypatch.setattr(layer_capture, 'split_by_budget', spy)
    search(other, batches, small_budget)
    assert groups_seen == [6]
    for (_, a), (_, b) in zip(qmodel.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b)


def test_sequential_search_runs_and_restores_modes():
    _, qmodel, _, config, batches = calibrated_tiny({'search': {**SMALL, 'sequential': True}})
    report = search(qmodel, batches, config)
    assert report.sequential
    assert all(layer.error_searched <= layer.error_initial for layer in report.layers)
    assert all(layer.mode == 'quant' for _, layer in quant_layers(qmodel))


def test_fast_quantizer_matches_the_grid_off_ties():
    q = DualRegionQuantizer(4)
    q.set_bounds(-30.0, 55.0)
    q.set_breakpoint(4.0)
    x = torch.randn(50_000) ** 3 * 5
    fast = lookup_quantizer(q.grid())(x)
    assert float((fast == q(x)).float().mean()) > 0.999


def test_minimize_scalar_finds_a_minimum_and_keeps_a_better_current():
    value, error = minimize_scalar(lambda v: (v - 3.3) ** 2, 10.0, 44.89, 0.1, 10.0, 8, 4, log=True)
    assert value == pytest.approx(3.3, rel=0.05) and error < 0.05
    value, error = minimize_scalar(lambda v: (v - 3.3) ** 2, 3.3, 0.0, 0.1, 10.0, 8, 2)
    assert value == 3.3 and error == 0.0


@pytest.mark.slow
def test_real_checkpoint_search_covers_every_layer(shared):
    """FSRCNN x4 (its last layer is a ConvTranspose2d) and IMDN x4, on small SunHays80 crops."""
    from oaq_plugin.archs.zoo import build_zoo_model
    from tiny_sr import calibration_crops
    batch = calibration_crops(shared)
    for key in ('fsrcnn_x4', 'imdn_x4'):
        model = build_zoo_model(key, shared)
        config = OAQConfig.from_dict({'search': {'num_samples': 2, 'window': 12, 'grid_size': 4, 'refine_rounds': 1}})
        qmodel = convert(model, config, batch[:1])
        calibrate(qmodel, [batch], config)
        report = search(qmodel, [batch], config)
        # In execution order, which differs from the declaration order in IMDN (cca runs before c5).
        assert sorted(layer.name for layer in report.layers) == sorted(n for n, _ in quant_layers(qmodel))
        assert all(layer.error_searched <= layer.error_initial for layer in report.layers)
        data = report.to_dict()
        assert data['relative_error_searched'] < data['relative_error_initial']
        with torch.no_grad():
            assert torch.isfinite(qmodel(batch[:1])).all()


class SharedBlock(nn.Module):
    """One conv run twice a forward (as CARN-M shares its residual block along the cascade)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        f = self.head(x)
        return self.tail(self.shared(torch.relu(self.shared(f))) * 4.0)


def test_a_layer_run_twice_is_captured_on_both_calls():
    from oaq_plugin.pipeline.capture.layer_capture import call_counts
    model = SharedBlock().eval()
    batches = [torch.rand(4, 3, 12, 12) for _ in range(2)]
    config = OAQConfig.from_dict({'search': SMALL})
    qmodel = convert(model, config, batches[0][:1])
    calls = call_counts(qmodel, batches[0][:1])
    assert calls == {'head': 1, 'shared': 2, 'tail': 1}
    set_mode(qmodel, 'float')
    seen = []
    handle = dict(quant_layers(qmodel))['shared'].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    captured = capture_windows(qmodel, batches[0], ['shared', 'tail'], 12, 0, calls=calls)
    handle.remove()
    # Windows as large as the input: the capture is the whole input of each call, in call order.
    assert captured['shared'].shape[0] == 8 and captured['tail'].shape[0] == 4
    assert torch.equal(captured['shared'], torch.cat(seen))
