"""Channel equalization: it finds the conv pairs whose channel scaling is exact (and no other), keeps the float
function, evens out the channel ranges the consumers see, and runs in the pipeline on a copy of the network."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from oaq_plugin import run_pipeline
from oaq_plugin.config import OAQConfig
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.pipeline.io.report import conversion_fields
from oaq_plugin.quant.equalization import channel_ranges, equalization_factors, equalize, exact_pairs
from tiny_sr import TinyResSR, tiny_images, single_thread  # noqa: F401  (autouse fixture)


class Chain(nn.Module):
    """Pairs that scale exactly (through PReLU, LeakyReLU or nothing, into a depthwise conv, a 1x1 conv, a conv
    and a transposed conv) and pairs that do not (an output also added to a residual, a GELU, a channel split)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu = nn.PReLU(8, init=0.2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)     # exact: head -> prelu -> depthwise
        self.pointwise = nn.Conv2d(8, 8, 1)                          # exact: depthwise -> leaky relu -> here
        self.residual = nn.Conv2d(8, 8, 3, padding=1)                # exact: pointwise -> here
        self.after_residual = nn.Conv2d(8, 8, 3, padding=1)          # not: residual's output is also added
        self.gelu_in = nn.Conv2d(8, 8, 3, padding=1)
        self.after_gelu = nn.Conv2d(8, 8, 3, padding=1)              # not: a GELU comes before it
        self.split = nn.Conv2d(8, 8, 3, padding=1)                   # exact: after_gelu -> here
        # not: split's channels are split
        self.from_half = nn.Conv2d(4, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)  # exact: tail -> relu -> up

    def forward(self, x):
        f = self.pointwise(nn.functional.leaky_relu(self.depthwise(self.prelu(self.head(x))), 0.1))
        r = self.residual(f)
        f = self.after_residual(torch.relu(r)) + r
        f = self.after_gelu(nn.functional.gelu(self.gelu_in(f)))
        a, b = self.split(f).chunk(2, dim=1)
        f = self.from_half(torch.relu(a)) + b.mean()
        return self.up(torch.relu(self.tail(f)))


def spread(network):
    """The network, built from a fixed seed, with its producers' output channels given very different scales
    (a network that needs equalizing)."""
    torch.manual_seed(0)
    model = network()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.out_channels == 8:
                factors = torch.logspace(-1.5, 0.5, 8)[torch.randperm(8)]
                module.weight.mul_(factors.view(-1, 1, 1, 1))
                module.bias.mul_(factors)
    return model.eval()


def inputs(count=4, size=16, seed=0):
    return torch.stack(tiny_images(count=count, size=size, seed=seed))


def test_only_the_exact_pairs_are_found():
    pairs = exact_pairs(spread(Chain), inputs(1))
    assert pairs == [('head', ['depthwise']), ('depthwise', ['pointwise']), ('pointwise', ['residual']),
                     ('after_gelu', ['split']), ('tail', ['up'])]


@pytest.mark.parametrize('strength', [0.5, 1.0])
def test_equalizing_keeps_the_function_and_evens_the_ranges(strength):
    model = spread(Chain)
    reference = spread(Chain)
    batches = [inputs(4, seed=1), inputs(4, seed=2)]
    pairs = exact_pairs(reference, inputs(1))
    before = channel_ranges(reference, pairs, batches)
    done = equalize(model, batches, inputs(1), strength)
    assert [pair.producer for pair in done] == ['head', 'depthwise', 'pointwise', 'after_gelu', 'tail']
    x = inputs(3, size=20, seed=5)
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    after = channel_ranges(model, pairs, batches)
    for producer in before:
        ratio_before = float(before[producer].max() / before[producer].min())
        ratio_after = float(after[producer].max() / after[producer].min())
        # Each channel's range times (widest / its range) ** strength: the spread shrinks to its 1 - strength power.
        assert ratio_after == pytest.approx(ratio_before ** (1 - strength), rel=1e-3), producer
    for pair in done:
        assert pair.min_scale == pytest.approx(1.0) and pair.max_scale > 1.0


def test_dead_channels_keep_their_scale():
    # A channel silent on the calibration batches is not amplified (it would overrun the grid where it wakes up).
    factors = equalization_factors(torch.tensor([2.0, 1.0, 0.0, 1e-4, 4e-3], dtype=torch.float64), 1.0)
    assert factors.tolist() == pytest.approx([1.0, 2.0, 1.0, 1.0, 500.0])
    assert equalization_factors(torch.tensor([4.0, 1.0], dtype=torch.float64), 0.5).tolist() == [1.0, 2.0]
    assert equalization_factors(torch.zeros(3, dtype=torch.float64), 1.0).tolist() == [1.0, 1.0, 1.0]


OPTIONS = {'calib': {'num_batches': 2, 'batch_size': 4, 'patch_size': 12}, 'search': {'enabled': False},
           'reconstruction': {'enabled': False}, 'distillation': {'enabled': False}}


def test_the_pipeline_equalizes_a_copy_and_leaves_the_float_network_alone():
    model = spread(TinyResSR)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    source = PatchSource(tiny_images(count=6))
    result = run_pipeline(model, source, {**OPTIONS, 'equalization': {'enabled': True}})
    # TinyResSR's blocks: conv1 -> LeakyReLU -> conv2, once per block.
    assert [(p.producer, p.consumers) for p in result.equalized] == [('block1.conv1', ['block1.conv2']),
                                                                      ('block2.conv1', ['block2.conv2'])]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert conversion_fields(result)['equalized'][0] == {
        'producer': 'block1.conv1', 'consumers': ['block1.conv2'], 'channels': 8,
        'min_scale': result.equalized[0].min_scale, 'max_scale': result.equalized[0].max_scale}
    plain = run_pipeline(model, source, OPTIONS)
    assert plain.equalized == [] and conversion_fields(plain)['equalized'] == []
    layers = dict(result.model.named_modules())
    assert not torch.equal(layers['block1.conv1'].module.weight, model.block1.conv1.weight)


def test_equalization_is_off_by_default_and_in_the_paper_preset():
    assert not OAQConfig().equalization.enabled
    assert not OAQConfig(preset='paper').equalization.enabled


def test_equalizing_unseen_architectures_keeps_their_function():
    """Spandrel's own classes (random weights): depthwise and large-kernel convs, norms, channel and window
    attention. Whatever pairs are found, the float output stays the same."""
    pytest.importorskip('spandrel', reason='spandrel is not installed (pip install spandrel==0.4.2)')
    from spandrel_tiny import CASES
    found = {}
    for case, (_, build) in sorted(CASES.items()):
        torch.manual_seed(0)
        model = build().eval()
        torch.manual_seed(0)
        reference = build().eval()
        batches = [inputs(2, size=16, seed=1)]
        found[case] = len(equalize(model, batches, batches[0][:1], 1.0))
        x = inputs(2, size=16, seed=4)
        with torch.no_grad():
            expected = reference(x.clone())  # RCAN scales its input in place
            assert torch.allclose(model(x.clone()), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max())), case
    # The plain CNNs have pairs to equalize (Compact's chain of six convs with PReLUs: five pairs).
    assert found['compact'] == 5 and found['rcan'] > 0, found
