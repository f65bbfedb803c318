"""Block reconstruction: how the network is cut into blocks, the per-block optimisation, and the stage in the
pipeline (report, export, resume)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from oaq_plugin import Interrupted, run_pipeline
from oaq_plugin.config import ReconstructionConfig
from oaq_plugin.pipeline.stages.block_reconstruction import (block_order, capture_block, reconstruct_block,
                                                      reconstruction_blocks)
from oaq_plugin.pipeline.io.export import load_quantized, save_quantized
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.pipeline.resume import load_state
from oaq_plugin.quant.activation import activation_quantizers
from oaq_plugin.quant.convert import set_mode
from oaq_plugin.quant.layers import quant_layers
from tiny_sr import (Block, TinyResSR, calibrated_tiny, tiny_images, tiny_pipeline_world,  # noqa: F401
                     single_thread)  # autouse fixture

RECONSTRUCTION = {'enabled': True, 'iterations': 40, 'num_samples': 4, 'patch_size': 12, 'batch_size': 2,
                  'max_layers': 2, 'lr': 5e-2}
OPTIONS = {
    'calib': {'num_batches': 3, 'batch_size': 4, 'patch_size': 12},
    'search': {'grid_size': 4, 'refine_rounds': 0, 'num_samples': 2, 'window': 8},
    'reconstruction': RECONSTRUCTION,
    'distillation': {'enabled': False},
}


def test_blocks_are_the_largest_modules_within_the_layer_limit():
    _, qmodel, _, _, _ = calibrated_tiny()
    assert reconstruction_blocks(qmodel, 2) == ['head', 'block1', 'block2', 'up']
    assert reconstruction_blocks(qmodel, 1) == ['head', 'block1.conv1', 'block1.conv2', 'block2.conv1',
                                                'block2.conv2', 'up']
    # The whole network (6 layers) is cut into its children even when it would fit.
    assert reconstruction_blocks(qmodel, 6) == ['head', 'block1', 'block2', 'up']


class SharedBlockSR(nn.Module):
    """One residual block run twice a forward, as CARN-M shares its block along a cascade."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = Block(8)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(self.shared(self.shared(self.head(x)))) + x


def test_a_shared_block_is_captured_on_every_call():
    torch.manual_seed(0)
    model = SharedBlockSR().eval()
    batches = PatchSource(tiny_images()).batches(2, 4, 12, seed=1)
    result = run_pipeline(model, batches, {**OPTIONS, 'search': {'enabled': False}})
    qmodel = result.model
    order, counts = block_order(qmodel, reconstruction_blocks(qmodel, 2), batches[0][:1])
    assert order == ['head', 'shared', 'tail'] and counts == {'head': 1, 'shared': 2, 'tail': 1}
    set_mode(qmodel, 'float')
    samples = batches[0]
    calls, outputs = capture_block(qmodel, 'shared', samples, 2, outputs=True)
    with torch.no_grad():
        first = model.shared(model.head(samples))
    torch.testing.assert_close(calls[0][0][0], model.head(samples).detach())
    torch.testing.assert_close(calls[1][0][0], first)
    torch.testing.assert_close(outputs[1], model.shared(first).detach())
    report = {block.name: block for block in result.reports['reconstruction'].blocks}
    assert report['shared'].calls == 2


def _captured(qmodel, name, samples):
    set_mode(qmodel, 'float')
    _, targets = capture_block(qmodel, name, samples, 1, outputs=True)
    calls, _ = capture_block(qmodel, name, samples, 1, outputs=False)
    return calls, targets


def test_reconstruction_lowers_the_block_output_error_and_learns_rounding_and_bounds():
    _, qmodel, _, _, batches = calibrated_tiny({'w_bits': 3, 'a_bits': 3})
    samples = torch.cat(batches)[:4]
    block = dict(qmodel.named_modules())['block1']
    calls, targets = _captured(qmodel, 'block1', samples)
    bounds = {name: float(q.upper.detach()) for name, q in activation_quantizers(block)}
    settings = ReconstructionConfig(**{**RECONSTRUCTION, 'iterations': 150})
    result = reconstruct_block('block1', block, calls, targets, settings)
    assert result.kept and result.error_after < 0.8 * result.error_before
    for _, layer in quant_layers(block):
        flags = layer.weight_quantizer.rounding
        assert flags is not None and flags.dtype == torch.uint8 and set(flags.unique().tolist()) <= {0, 1}
        assert layer.executor is None
    assert any(float(q.upper.detach()) != bounds[name] for name, q in activation_quantizers(block))
    # The training-time patches of the quantizers are gone.
    assert all('forward' not in vars(q) for _, q in activation_quantizers(block))


def test_a_reconstruction_that_does_not_help_is_not_kept():
    _, qmodel, _, _, batches = calibrated_tiny({'w_bits': 3, 'a_bits': 3})
    block = dict(qmodel.named_modules())['block1']
    calls, targets = _captured(qmodel, 'block1', torch.cat(batches)[:4])
    state = {k: v.clone() for k, v in block.state_dict().items()}
    # Zero steps leave the initial soft choices (which harden to round-to-nearest) and the bounds as they
    # were: no lower error, so nothing is kept and the block is exactly as before.
    settings = ReconstructionConfig(**{**RECONSTRUCTION, 'lr': 0.0, 'act_lr': 0.0})
    result = reconstruct_block('block1', block, calls, targets, settings)
    assert not result.kept and result.reduction == 0.0
    assert all(layer.weight_quantizer.rounding is None for _, layer in quant_layers(block))
    after = block.state_dict()
    assert state.keys() == after.keys()
    for key in state:
        torch.testing.assert_close(after[key], state[key], rtol=0, atol=0, equal_nan=True)


def test_pipeline_stage_reports_and_exports(tmp_path):
    model, batches, config = tiny_pipeline_world({**OPTIONS, 'w_bits': 3, 'a_bits': 3})
    result = run_pipeline(model, batches, config)
    report = result.reports['reconstruction'].to_dict()
    assert [block['name'] for block in report['blocks']] == ['head', 'block1', 'block2', 'up']
    assert report['relative_error_after'] < report['relative_error_before']
    assert result.timings['reconstruction_s'] > 0
    # What was learned travels in the saved checkpoint: the loaded model gives the same output bit for bit.
    path = tmp_path / 'q.pth'
    save_quantized(result.model, path, config)
    loaded = load_quantized(path, TinyResSR().eval())
    x = batches[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_reconstruction_stage_stopped_resumes_to_identical_parameters(tmp_path):
    from test_resume import StopAtCheck, assert_same_result
    model, batches, config = tiny_pipeline_world(OPTIONS)
    reference = run_pipeline(model, batches, config)
    path = tmp_path / 'state.pth'
    # Safe points: 3 calibration batches, 6 searched layers, then one before each block.
    with pytest.raises(Interrupted):
        run_pipeline(model, batches, config, state_path=path, stop=StopAtCheck(3 + 6 + 3))
    state = load_state(path)
    assert state['stage'] == 'reconstruction' and len(state['progress']['report']['blocks']) == 2
    resumed = run_pipeline(model, batches, config, state_path=path, resume=True)
    assert_same_result(resumed, reference)
    resumed_blocks = resumed.reports['reconstruction'].blocks
    assert [block.to_dict() for block in resumed_blocks] == \
        [{**block.to_dict(), 'seconds': resumed_block.seconds}
         for block, resumed_block in zip(reference.reports['reconstruction'].blocks, resumed_blocks)]


class GatedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, gate, shift=None):
        return self.conv(x) * gate + shift


class GatedSR(nn.Module):
    """A block called with a tensor shared by every sample and a keyword argument."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.block = GatedBlock()
        self.tail = nn.Conv2d(8, 3, 3, padding=1)
        self.register_buffer('gate', torch.linspace(0.5, 1.5, 8).reshape(8, 1, 1))

    def forward(self, x):
        f = self.head(x)
        return self.tail(self.block(f, self.gate, shift=0.1 * f)) + x


def test_shared_arguments_and_keywords_are_captured_and_replayed():
    torch.manual_seed(0)
    model = GatedSR().eval()
    batches = PatchSource(tiny_images()).batches(2, 6, 12, seed=1)
    result = run_pipeline(model, batches, {**OPTIONS, 'search': {'enabled': False},
                                           'reconstruction': {**RECONSTRUCTION, 'num_samples': 6}})
    qmodel = result.model
    set_mode(qmodel, 'float')
    samples = batches[0]
    # Chunks of 4 and 2 samples: the per-sample tensors are joined, the shared gate is kept once.
    calls, outputs = capture_block(qmodel, 'block', samples, 1, outputs=True, chunk=4)
    (args, kwargs), = calls
    assert args[0].shape[0] == 6 and torch.equal(args[1], model.gate) and kwargs['shift'].shape[0] == 6
    with torch.no_grad():
        torch.testing.assert_close(outputs[0], model.block(model.head(samples), model.gate,
                                                           shift=0.1 * model.head(samples)))
    assert [block.name for block in result.reports['reconstruction'].blocks] == ['head', 'block', 'tail']


class InPlacePartialConv(nn.Module):
    """A partial convolution written into its input in eval mode (as RealPLKSR's, FasterNet's): the first
    quarter of the channels is convolved and stored back into the tensor the conv read a view of."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.partial = nn.Conv2d(2, 2, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        f = self.head(x)
        f[:, :2] = self.partial(f[:, :2])
        return self.shuffle(self.tail(torch.relu(self.mix(f)) + f))


def test_a_network_writing_into_a_quantized_layers_input_reconstructs_and_finetunes():
    torch.manual_seed(0)
    model = InPlacePartialConv().eval()
    images = tiny_images(count=4, size=16)
    batches = PatchSource(images).batches(2, 2, 12, 0)
    result = run_pipeline(model, PatchSource(images), {
        'calib': {'num_batches': 2, 'batch_size': 2, 'patch_size': 12}, 'search': {'enabled': False},
        'reconstruction': {**RECONSTRUCTION, 'iterations': 3},
        'finetune': {'enabled': True, 'epochs': 1, 'iters_per_epoch': 2, 'batch_size': 1, 'patch_size': 12,
                     'tap_samples': 1}})
    assert {block.name for block in result.reports['reconstruction'].blocks} >= {'partial'}
    with torch.no_grad():
        assert torch.isfinite(result.model(batches[0])).all()
