"""Distillation with trainable weights: it lowers the output error on inputs it never trained on, starts from
the codes the earlier stages chose, keeps every weight on its grid, is undone when it does not help, skips
what it cannot train, and resumes exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from oaq_plugin import Interrupted, run_pipeline
from oaq_plugin.config import OAQConfig
from oaq_plugin.pipeline.io.export import load_quantized, save_quantized
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.pipeline.resume import load_state
from oaq_plugin.pipeline.stages.base import StageContext
from oaq_plugin.pipeline.stages.distillation import distill
from oaq_plugin.quant.layers import quant_layers
from tiny_sr import TinyResSR, tiny_images, single_thread  # noqa: F401  (autouse fixture)

DISTILLATION = {'iterations': 200, 'patch_size': 16, 'batch_size': 4, 'check_crops': 4}
OPTIONS = {'calib': {'num_batches': 3, 'batch_size': 4, 'patch_size': 12}, 'search': {'enabled': False},
           'reconstruction': {'enabled': False}, 'distillation': DISTILLATION}


def world(options=OPTIONS, model=None):
    torch.manual_seed(0)
    model = (model or TinyResSR()).eval()
    source = PatchSource(tiny_images(count=8))
    return model, source, OAQConfig.from_dict(options)


def without_distillation(options):
    return {**options, 'distillation': {'enabled': False}}


def held_out_error(fp_model, qmodel):
    """Relative output error on inputs neither calibration nor distillation saw."""
    x = torch.stack(tiny_images(count=4, size=20, seed=7))
    with torch.no_grad():
        target = fp_model(x)
        return float(((qmodel(x) - target) ** 2).sum() / (target ** 2).sum())


def test_distillation_lowers_the_held_out_output_error():
    model, source, config = world()
    plain = run_pipeline(model, source, without_distillation(OPTIONS)).model
    result = run_pipeline(model, source, config)
    report = result.reports['distillation']
    assert report.kept and report.iterations == 200 and report.weight_layers == len(quant_layers(result.model))
    # Every 4-bit activation grid trains (the 8-bit first, last and upsampler inputs do not).
    assert report.activation_quantizers == sum(layer.act_quantizer.bits <= 6 for _, layer in quant_layers(plain))
    assert report.error_after < report.error_before
    assert held_out_error(model, result.model) < 0.9 * held_out_error(model, plain)
    assert result.timings['distillation_s'] > 0
    assert result.report_dicts()['distillation']['gain_db'] > 0


def test_distilled_weights_stay_on_their_grids_and_move(tmp_path):
    model, source, config = world()
    plain = run_pipeline(model, source, without_distillation(OPTIONS)).model
    distilled = run_pipeline(model, source, config).model
    # What was learned travels in the saved checkpoint: the loaded model gives the same output bit for bit.
    save_quantized(distilled, tmp_path / 'q.pth', config)
    loaded = load_quantized(tmp_path / 'q.pth', TinyResSR().eval())
    x = torch.stack(tiny_images(count=2, size=16, seed=3))
    with torch.no_grad():
        assert torch.equal(loaded(x), distilled(x))
    moved = 0
    for (name, layer), (_, before) in zip(quant_layers(distilled), quant_layers(plain)):
        codes, step, zero_point = layer.weight_quantizer.integer_codes(layer.weight)
        assert torch.equal((codes.float() - zero_point) * step, layer.quantized_weight()), name
        old_codes, _, _ = before.weight_quantizer.integer_codes(before.weight)
        moved += int((codes != old_codes).sum())
        # The clips stay as searched: only the weights moved.
        assert torch.equal(layer.weight_quantizer.clip, before.weight_quantizer.clip), name
    assert moved > 0


def test_distillation_that_does_not_help_is_undone():
    # Steps of 50 quantization steps an iteration wreck the weights: the output error rises, and every
    # weight and activation parameter goes back to where the stage found it.
    options = {**OPTIONS, 'distillation': {**DISTILLATION, 'weight_lr': 50.0, 'act_lr': 5.0}}
    model, source, config = world(options)
    plain = run_pipeline(model, source, without_distillation(options)).model
    result = run_pipeline(model, source, config)
    assert not result.reports['distillation'].kept
    x = torch.stack(tiny_images(count=2, size=16, seed=3))
    with torch.no_grad():
        assert torch.equal(result.model(x), plain(x))
    for (name, layer), (_, before) in zip(quant_layers(result.model), quant_layers(plain)):
        assert torch.equal(layer.quantized_weight(), before.quantized_weight()), name
        for key, value in before.act_quantizer.named_parameters():
            assert torch.equal(dict(layer.act_quantizer.named_parameters())[key], value), (name, key)


class TwoOutputs(TinyResSR):
    def forward(self, x):
        out = super().forward(x)
        return out, out.mean()


class TiedWeights(TinyResSR):
    """``block2.conv2`` shares ``block2.conv1``'s weight."""

    def __init__(self):
        super().__init__()
        self.block2.conv2.weight = self.block2.conv1.weight


def test_a_network_without_one_output_tensor_is_skipped_with_the_reason():
    model, source, config = world()
    qmodel = run_pipeline(model, source, without_distillation(OPTIONS)).model
    teacher = TwoOutputs().eval()
    teacher.load_state_dict(model.state_dict())
    report = distill(StageContext(qmodel=qmodel, batches=(), config=config, float_model=teacher, source=source))
    assert not report.kept and report.iterations == 0 and 'not one tensor' in report.skipped
    assert 'skipped' in report.summary()


def test_tied_weights_stay_as_the_earlier_stages_left_them():
    model, source, config = world(model=TiedWeights())
    result = run_pipeline(model, source, config)
    layers = dict(quant_layers(result.model))
    assert result.reports['distillation'].weight_layers == len(layers) - 2
    assert torch.equal(layers['block2.conv1'].weight, model.block2.conv1.weight)


def test_distillation_stopped_resumes_to_identical_parameters(tmp_path):
    from test_resume import StopAtCheck, assert_same_result
    model, source, config = world()
    reference = run_pipeline(model, source, config)
    path = tmp_path / 'state.pth'
    # Safe points: 3 calibration batches, then one before each distillation iteration.
    with pytest.raises(Interrupted):
        run_pipeline(model, source, config, state_path=path, stop=StopAtCheck(3 + 17))
    state = load_state(path)
    assert state['stage'] == 'distillation' and state['progress']['iteration'] == 16
    resumed = run_pipeline(model, source, config, state_path=path, resume=True)
    assert_same_result(resumed, reference)
    a, b = resumed.reports['distillation'], reference.reports['distillation']
    assert (a.error_before, a.error_after, a.kept, a.losses) == (b.error_before, b.error_after, b.kept, b.losses)


def test_the_paper_preset_does_not_distil():
    assert OAQConfig().distillation.enabled
    assert not OAQConfig.from_dict({'preset': 'paper'}).distillation.enabled


def test_the_start_keeps_the_codes_that_learned_rounding_chose():
    # Learned rounding (inside block reconstruction) rounds some weights away from nearest; distillation drops
    # it and starts each weight inside its code's interval, so with nothing learned every code is unchanged.
    reconstruction = {'enabled': True, 'iterations': 20, 'num_samples': 4, 'patch_size': 12, 'batch_size': 2}
    options = {**OPTIONS, 'reconstruction': reconstruction}
    model, source, config = world({**options, 'distillation': {**DISTILLATION, 'iterations': 3, 'weight_lr': 0.0,
                                                                'act_lr': 0.0}})
    reconstructed = run_pipeline(model, source, without_distillation(options)).model
    layers = dict(quant_layers(reconstructed))
    away = 0
    for layer in layers.values():
        quantizer = layer.weight_quantizer
        nearest = torch.round(quantizer.grid_position(layer.weight, quantizer.effective_clip(quantizer.clip)))
        away += int((quantizer.integer_codes(layer.weight)[0].float() != nearest).sum())
    assert away > 0  # the case the start is for
    result = run_pipeline(model, source, config)
    assert not result.reports['distillation'].kept
    for name, layer in quant_layers(result.model):
        assert torch.equal(layer.quantized_weight(), layers[name].quantized_weight()), name
    x = torch.stack(tiny_images(count=2, size=20, seed=3))
    with torch.no_grad():
        assert torch.equal(result.model(x), reconstructed(x))


def test_dropped_quantization_passes_a_fraction_of_values_unquantized_while_active():
    from oaq_plugin.quant.activation import dropped_quantization, activation_quantizers
    model, source, config = world()
    qmodel = run_pipeline(model, source, without_distillation(OPTIONS)).model
    _, layer = quant_layers(qmodel)[1]
    quantizer = layer.act_quantizer
    x = torch.randn(2, 8, 16, 16) * 3
    quantized = quantizer(x).detach()
    assert (quantized != x).float().mean() > 0.99
    with dropped_quantization(activation_quantizers(qmodel), 0.3, torch.Generator().manual_seed(0)):
        mixed = quantizer(x).detach()
    kept_float = (mixed == x).float().mean()
    assert 0.27 < kept_float < 0.33
    assert torch.equal(mixed[mixed != x], quantized[mixed != x])
    assert torch.equal(quantizer(x).detach(), quantized)


def test_distillation_with_activation_drop_resumes_to_identical_parameters(tmp_path):
    from test_resume import StopAtCheck, assert_same_result
    options = {**OPTIONS, 'distillation': {**DISTILLATION, 'iterations': 30, 'drop_prob': 0.5}}
    model, source, config = world(options)
    reference = run_pipeline(model, source, config)
    without = run_pipeline(model, source, {**options, 'distillation': {**DISTILLATION, 'iterations': 30}})
    assert reference.reports['distillation'].losses != without.reports['distillation'].losses
    path = tmp_path / 'state.pth'
    with pytest.raises(Interrupted):
        run_pipeline(model, source, config, state_path=path, stop=StopAtCheck(3 + 12))
    resumed = run_pipeline(model, source, config, state_path=path, resume=True)
    assert_same_result(resumed, reference)
    assert resumed.reports['distillation'].losses == reference.reports['distillation'].losses


def test_feature_term_trains_on_the_block_outputs_and_leaves_no_hook():
    options = {**OPTIONS, 'distillation': {**DISTILLATION, 'feature_weight': 1.0}}
    model, source, config = world(options)
    plain = run_pipeline(model, source, without_distillation(OPTIONS)).model
    output_only = run_pipeline(model, source, OPTIONS)
    result = run_pipeline(model, source, config)
    report = result.reports['distillation']
    # TinyResSR's two residual blocks are the taps.
    assert (report.feature_taps, report.tap_kind) == (2, 'blocks')
    assert '2 blocks feature taps' in report.summary()
    assert output_only.reports['distillation'].feature_taps == 0
    assert report.losses != output_only.reports['distillation'].losses
    # The feature term is added to the output term: the logged loss is larger at the same start.
    assert report.losses[0] > output_only.reports['distillation'].losses[0]
    assert report.kept and held_out_error(model, result.model) < 0.9 * held_out_error(model, plain)
    for net in (model, result.model):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_feature_term_is_the_mean_relative_error_of_the_taps():
    from oaq_plugin.pipeline.stages.distillation import _FeatureTerm
    torch.manual_seed(0)
    teacher = TinyResSR().eval()
    student = TinyResSR().eval()
    student.load_state_dict(teacher.state_dict())
    x = torch.stack(tiny_images(count=2, size=16))
    term = _FeatureTerm(teacher, student, x[:1])
    teacher(x), student(x)
    value, taps = term.loss()
    assert taps == 2 and float(value) == 0.0
    with torch.no_grad():
        student.block2.conv2.weight.mul_(1.5)
    features = {}
    for name in ('block1', 'block2'):
        getattr(teacher, name).register_forward_hook(lambda m, a, o, n=name: features.setdefault(('t', n), o))
        getattr(student, name).register_forward_hook(lambda m, a, o, n=name: features.setdefault(('s', n), o))
    teacher(x), student(x)
    value, taps = term.loss()
    expected = [float(((features[('s', n)] - features[('t', n)]) ** 2).mean() / (features[('t', n)] ** 2).mean())
                for n in ('block1', 'block2')]
    assert expected[0] == 0.0 and expected[1] > 0
    assert taps == 2 and float(value) == pytest.approx(sum(expected) / 2, rel=1e-6)
    # Recorded tensors are released by ``loss``; a forward of one model alone gives no term.
    teacher(x)
    assert term.loss() == (None, 0)
    term.remove()


@pytest.mark.parametrize('bits, limit, learned', [(4, 6, 'body'), (8, 6, 'none'), (8, 8, 'all'), (4, 8, 'all')])
def test_distillation_learns_the_activation_grids_up_to_activation_bits(bits, limit, learned):
    options = {**OPTIONS, 'w_bits': bits, 'a_bits': bits,
               'distillation': {**DISTILLATION, 'iterations': 4, 'activation_bits': limit}}
    model, source, config = world(options)
    result = run_pipeline(model, source, config)
    grids = [layer.act_quantizer.bits for _, layer in quant_layers(result.model)]
    expected = {'body': sum(b == bits for b in grids), 'all': len(grids), 'none': 0}[learned]
    assert result.reports['distillation'].activation_quantizers == expected
    if learned == 'body':  # the end layers' 8-bit grids exist and keep their values
        assert 0 < expected < len(grids)


class WithPReLU(TinyResSR):
    """A float PReLU (its slopes stay float) between the blocks."""

    def __init__(self):
        super().__init__()
        self.prelu = nn.PReLU(8, init=0.2)

    def forward(self, x):
        f = self.head(x)
        body = self.block2(self.prelu(self.block1(f)))
        return self.shuffle(self.up(body + f)) + nn.functional.interpolate(x, scale_factor=2)


FLOATS = {**OPTIONS, 'distillation': {**DISTILLATION, 'float_lr': 1e-2}}


def float_parameters(model):
    """The biases and PReLU slopes: what ``float_lr`` trains."""
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if name.endswith('bias') or name.startswith('prelu')}


def test_float_lr_trains_the_biases_and_float_slopes_and_leaves_the_teacher_alone():
    model, source, config = world(FLOATS, model=WithPReLU())
    teacher_before = {k: v.clone() for k, v in model.state_dict().items()}
    without = run_pipeline(model, source, world(OPTIONS, model=WithPReLU())[2])
    result = run_pipeline(model, source, config)
    report = result.reports['distillation']
    expected = sum(p.numel() for p in float_parameters(model).values())
    assert report.kept and report.float_parameters == expected and 'float parameters' in report.summary()
    after, start = float_parameters(result.model), float_parameters(model)
    assert len(after) == len(start) == 7  # six convs' biases and the slopes, in the same order
    assert all(not torch.equal(a, b) for a, b in zip(after.values(), start.values()))
    # Without it they stay as the float network has them.
    assert all(torch.equal(a, b) for a, b in zip(float_parameters(without.model).values(), start.values()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_float_parameters_go_back_when_distillation_does_not_help():
    options = {**FLOATS, 'distillation': {**FLOATS['distillation'], 'weight_lr': 50.0, 'float_lr': 50.0}}
    model, source, config = world(options, model=WithPReLU())
    result = run_pipeline(model, source, config)
    assert not result.reports['distillation'].kept
    for a, b in zip(float_parameters(result.model).values(), float_parameters(model).values()):
        assert torch.equal(a, b)


def test_distillation_of_float_parameters_resumes_to_identical_parameters(tmp_path):
    from test_resume import StopAtCheck, assert_same_result
    model, source, config = world(FLOATS, model=WithPReLU())
    reference = run_pipeline(model, source, config)
    path = tmp_path / 'state.pth'
    with pytest.raises(Interrupted):
        run_pipeline(model, source, config, state_path=path, stop=StopAtCheck(3 + 40))
    resumed = run_pipeline(model, source, config, state_path=path, resume=True)
    assert_same_result(resumed, reference)
    for a, b in zip(float_parameters(resumed.model).values(), float_parameters(reference.model).values()):
        assert torch.equal(a, b)
