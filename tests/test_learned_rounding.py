"""Learned weight rounding: the quantizer's round-up flags, the per-layer optimisation, and the stage in the
pipeline (report, export, finetuning, resume)."""
from __future__ import annotations

import pytest
import torch

from oaq_plugin import Interrupted, run_pipeline
from oaq_plugin.pipeline.io.export import load_quantized, save_quantized
from oaq_plugin.pipeline.stages.finetune import parameter_groups
from oaq_plugin.pipeline.stages.learned_rounding import (beta_at, initial_variables, learn_layer_rounding,
                                                  regulariser, soft_choice)
from oaq_plugin.pipeline.capture.layer_capture import capture_windows
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.pipeline.resume import load_state
from oaq_plugin.quant.convert import set_mode
from oaq_plugin.quant.layers import quant_layers
from oaq_plugin.quant.weight import WeightQuantizer
from tiny_sr import (TinyResSR, calibrated_tiny, tiny_images, tiny_pipeline_world,  # noqa: F401
                     single_thread)  # autouse fixture

ROUNDING = {'enabled': True, 'iterations': 60, 'num_samples': 4, 'window': 8, 'batch_size': 2, 'lr': 5e-2}
OPTIONS = {
    'calib': {'num_batches': 3, 'batch_size': 4, 'patch_size': 12},
    'search': {'grid_size': 4, 'refine_rounds': 0, 'num_samples': 2, 'window': 8},
    'rounding': ROUNDING,
    'reconstruction': {'enabled': False}, 'distillation': {'enabled': False},
}


def test_rounding_flags_pick_floor_or_ceiling_of_the_grid_position():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3)
    quantizer = WeightQuantizer(4, granularity='channel')
    quantizer.initialize(weight)
    nearest = quantizer(weight)
    clip = quantizer.clip.detach()
    position = quantizer.grid_position(weight, clip)
    step = quantizer.step(clip)
    quantizer.set_rounding(torch.zeros_like(weight))
    down = quantizer(weight)
    torch.testing.assert_close(down, (torch.floor(position) - quantizer.zero_point) * step)
    quantizer.set_rounding(torch.ones_like(weight))
    up = quantizer(weight)
    top = quantizer.num_levels - 1
    torch.testing.assert_close(up, (torch.clamp(torch.floor(position) + 1, 0, top) - quantizer.zero_point) * step)
    assert not torch.equal(down, nearest) and not torch.equal(up, nearest)
    # The integer codes follow the flags too (the backends and the export read them).
    codes, code_step, zero_point = quantizer.integer_codes(weight)
    torch.testing.assert_close((codes.float() - zero_point) * code_step, up)
    # Nearest again without flags.
    quantizer.set_rounding(None)
    assert torch.equal(quantizer(weight), nearest)


def test_rounding_flags_travel_in_the_state_dict():
    torch.manual_seed(1)
    weight = torch.randn(6, 4)
    source = WeightQuantizer(3, granularity='tensor')
    source.initialize(weight)
    flags = (torch.rand_like(weight) > 0.5).to(torch.uint8)
    source.set_rounding(flags)
    fresh = WeightQuantizer(3, granularity='tensor')
    fresh.initialize(weight)
    fresh.load_state_dict(source.state_dict())
    assert torch.equal(fresh.rounding, flags)
    assert torch.equal(fresh(weight), source(weight))
    # A state without flags brings back nearest rounding.
    plain = WeightQuantizer(3, granularity='tensor')
    plain.initialize(weight)
    fresh.load_state_dict(plain.state_dict())
    assert fresh.rounding is None


def test_soft_choice_parts():
    fraction = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    torch.testing.assert_close(soft_choice(initial_variables(fraction)), fraction, atol=2e-6, rtol=0)
    assert float(regulariser(torch.tensor([0.0, 1.0]), 2.0)) == 0.0
    assert float(regulariser(torch.tensor([0.5]), 2.0)) == 1.0
    assert beta_at(0, 100, 0.2) is None and beta_at(19, 100, 0.2) is None
    assert beta_at(20, 100, 0.2) == pytest.approx(20.0) and beta_at(99, 100, 0.2) == pytest.approx(2.0)


def test_learned_rounding_lowers_the_layer_output_error():
    _, qmodel, _, config, batches = calibrated_tiny({'w_bits': 3, 'a_bits': 8})
    samples = torch.cat(batches)[:4]
    name, layer = [(n, m) for n, m in quant_layers(qmodel) if n == 'block1.conv1'][0]
    set_mode(qmodel, 'float')
    inputs = capture_windows(qmodel, samples, [name], 8, 0)[name]
    settings = config.rounding.__class__(**{**ROUNDING, 'iterations': 200})
    result = learn_layer_rounding(name, layer, inputs, inputs, settings)
    assert result.kept and result.error_learned < 0.9 * result.error_nearest
    assert 0.0 < result.flipped < 0.5
    flags = layer.weight_quantizer.rounding
    assert flags is not None and flags.dtype == torch.uint8 and set(flags.unique().tolist()) <= {0, 1}


def test_a_rounding_that_does_not_help_is_not_kept():
    _, qmodel, _, config, batches = calibrated_tiny({'w_bits': 3, 'a_bits': 8})
    name, layer = [(n, m) for n, m in quant_layers(qmodel) if n == 'block1.conv1'][0]
    set_mode(qmodel, 'float')
    inputs = capture_windows(qmodel, torch.cat(batches)[:4], [name], 8, 0)[name]
    # Zero steps leave the initial soft choice (the fractions), which hardens to round-to-nearest exactly:
    # no lower error, so nothing is kept.
    settings = config.rounding.__class__(**{**ROUNDING, 'lr': 0.0})
    result = learn_layer_rounding(name, layer, inputs, inputs, settings)
    assert not result.kept and result.reduction == 0.0
    assert layer.weight_quantizer.rounding is None


def test_pipeline_stage_reports_exports_and_fixes_clips(tmp_path):
    model, batches, config = tiny_pipeline_world(OPTIONS)
    result = run_pipeline(model, batches, config)
    report = result.reports['rounding'].to_dict()
    assert [layer['name'] for layer in report['layers']] == [name for name, _ in quant_layers(result.model)]
    assert report['relative_error_learned'] < report['relative_error_nearest']
    assert result.timings['rounding_s'] > 0
    learned = [name for name, layer in quant_layers(result.model) if layer.weight_quantizer.rounding is not None]
    assert learned == [layer['name'] for layer in report['layers'] if layer['kept']] and learned
    # The saved codes carry the learned rounding: the loaded model gives the same output bit for bit.
    path = tmp_path / 'q.pth'
    save_quantized(result.model, path, config)
    loaded = load_quantized(path, TinyResSR().eval())
    x = batches[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    # Finetuning leaves the clips of layers with learned rounding alone.
    clips = {name for name, _ in parameter_groups(result.model).get('weight_clip', [])}
    assert clips == {f'{name}.weight_quantizer.clip' for name, layer in quant_layers(result.model)
                     if layer.weight_quantizer.rounding is None}


def test_rounding_stage_stopped_resumes_to_identical_parameters(tmp_path):
    from test_resume import StopAtCheck, assert_same_result
    model, batches, config = tiny_pipeline_world(OPTIONS)
    reference = run_pipeline(model, batches, config)
    path = tmp_path / 'state.pth'
    # Safe points: 3 calibration batches, 6 searched layers, then one before each layer's rounding.
    with pytest.raises(Interrupted):
        run_pipeline(model, batches, config, state_path=path, stop=StopAtCheck(3 + 6 + 3))
    state = load_state(path)
    assert state['stage'] == 'rounding' and len(state['progress']['report']['layers']) == 2
    resumed = run_pipeline(model, batches, config, state_path=path, resume=True)
    assert_same_result(resumed, reference)
    assert [layer.to_dict() for layer in resumed.reports['rounding'].layers] == [
        layer.to_dict() for layer in reference.reports['rounding'].layers]


class TokenMLP(torch.nn.Module):
    """Linear layers on the pixels of an image, as a transformer's MLP runs on tokens."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 16)
        self.fc2 = torch.nn.Linear(16, 16)
        self.fc3 = torch.nn.Linear(16, 3)

    def forward(self, x):
        tokens = x.permute(0, 2, 3, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(tokens))))).permute(0, 3, 1, 2)


def test_linear_layers_learn_their_rounding_on_token_windows():
    torch.manual_seed(0)
    model = TokenMLP().eval()
    batches = PatchSource(tiny_images()).batches(2, 4, 12, seed=1)
    # fc2 runs at 3 bits (a body layer: roles come from the graph, not from the token layout's sizes).
    options = {**OPTIONS, 'w_bits': 3, 'rounding': {**ROUNDING, 'iterations': 300}}
    result = run_pipeline(model, batches, options)
    report = {layer.name: layer for layer in result.reports['rounding'].layers}
    assert set(report) == {'fc1', 'fc2', 'fc3'}
    assert report['fc2'].kept and report['fc2'].error_learned < report['fc2'].error_nearest


def test_sensitivity_at_other_bits_rounds_to_nearest_and_restores_the_flags():
    from oaq_plugin.pipeline.analysis.sensitivity import layer_bits
    _, qmodel, _, _, _ = calibrated_tiny()
    layer = dict(quant_layers(qmodel))['block1.conv1']
    flags = torch.ones_like(layer.weight, dtype=torch.uint8)
    layer.weight_quantizer.set_rounding(flags)
    with layer_bits(layer, 8):
        assert layer.weight_quantizer.rounding is None and layer.weight_quantizer.bits == 8
    assert torch.equal(layer.weight_quantizer.rounding, flags) and layer.weight_quantizer.bits == 4
