"""Conversion outside the zoo: tiny weight channels and huge activations, layer roles from the graph
(padded inputs, channels-last tokens, repeated conversions), batch-norm folding, generic attention and
the accounting of what stays in float."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from oaq_plugin import OAQConfig, quantize
from oaq_plugin.backends.reference import decode_input
from oaq_plugin.backends.select import to_backend
from oaq_plugin.pipeline.io.export import load_quantized, save_quantized
from oaq_plugin.quant import DualRegionQuantizer, QuantLayer, UniformQuantizer, WeightQuantizer, convert, plan_layers
from oaq_plugin.quant.convert import set_mode
from oaq_plugin.quant.region_grid import MIN_STEP

from layer_cases import CALIBRATION_ONLY  # noqa: E402
from tiny_sr import single_thread  # noqa: F401,E402 (autouse fixture)



def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((value - reference) ** 2).sum() / (reference ** 2).sum())


# -- 1. tiny weight channels, all-zero channels, huge activations --------------------------------------
@settings(max_examples=80, deadline=None)
@given(bits=st.integers(2, 8), exponent=st.floats(-11.0, 1.0), grid=st.sampled_from(['paper', 'zero']),
       granularity=st.sampled_from(['channel', 'tensor']), seed=st.integers(0, 2 ** 16))
def test_weight_codes_decode_inside_half_a_step_at_any_scale(bits, exponent, grid, granularity, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(5, 3, 3, 3, generator=generator) * 10.0 ** exponent
    weight[1] = 0.0                                   # an all-zero channel
    weight[2] *= 1e-3                                 # a channel far below the others
    quantizer = WeightQuantizer(bits, granularity=granularity, grid=grid)
    quantizer.initialize(weight)
    with torch.no_grad():
        quantized = quantizer(weight)
    codes, step, zero_point = quantizer.integer_codes(weight)
    decoded = (codes.float() - zero_point) * step
    # Fake quantization, integer codes and their decode are one arithmetic.
    torch.testing.assert_close(decoded, quantized, rtol=1e-6, atol=0.0)
    clip = torch.clamp(quantizer.clip.detach(), min=MIN_STEP)
    # Every weight decodes within half a step of its clipped value: the grid spans [-clip, clip] exactly.
    error = (quantized - torch.maximum(torch.minimum(weight, clip), -clip)).abs()
    assert bool((error <= step / 2 * (1 + 1e-4)).all()), float((error / step).max())
    if granularity == 'channel':
        assert float(quantized[1].abs().max()) <= float(step.reshape(-1)[1]) / 2 * (1 + 1e-4)


def test_weights_of_std_1e7_lose_less_at_8_bits_than_at_4():
    torch.manual_seed(0)
    weight = torch.randn(16, 16, 3, 3) * 1e-7
    errors = {}
    for bits in (4, 8):
        quantizer = WeightQuantizer(bits)
        quantizer.initialize(weight)
        with torch.no_grad():
            errors[bits] = relative_error(quantizer(weight), weight)
    # Before the fix, 8 bits gave 93.9 (every weight shifted by about 1e-6) against 0.011 at 4 bits.
    assert errors[8] < 1e-3 < errors[4] < 0.05, errors


class SqueezeExcitationTail(nn.Module):
    """A head conv, a gate that amplifies to about 1e6, and a conv with weights of std 5e-7 on it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.excite = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            self.excite.weight.normal_(0.0, 5e-7)
            self.excite.bias.zero_()

    def forward(self, x):
        features = self.head(x)
        return self.tail(features + self.excite(features * 1e6))


def test_tiny_weights_on_huge_activations_quantize_at_8_bits():
    torch.manual_seed(0)
    model = SqueezeExcitationTail().eval()
    batches = [torch.rand(2, 3, 16, 16) for _ in range(2)]
    qmodel = quantize(model, batches, {**CALIBRATION_ONLY, 'w_bits': 8, 'a_bits': 8, 'act_quantizer': 'minmax'})
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        reference = model.excite(model.head(x) * 1e6)
        layer = qmodel.excite
        fake = layer(qmodel.head(x) * 1e6)
        to_backend(qmodel, 'reference')
        integer = layer(qmodel.head(x) * 1e6)
    # The shifted decode made this layer's output error of order 1 (the lost 13.5 dB).
    assert relative_error(fake, reference) < 1e-3
    torch.testing.assert_close(integer, fake, rtol=1e-5, atol=1e-5)


def test_tiny_and_zero_channels_survive_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SqueezeExcitationTail().eval()
    with torch.no_grad():
        model.excite.weight[3] = 0.0
    config = OAQConfig.from_dict({**CALIBRATION_ONLY, 'w_bits': 8, 'a_bits': 8})
    qmodel = quantize(model, [torch.rand(2, 3, 16, 16)], config)
    path = save_quantized(qmodel, tmp_path / 'tiny.pth', config)
    loaded = load_quantized(path, model=SqueezeExcitationTail())
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert torch.equal(loaded.excite.weight_quantizer.integer_codes(loaded.excite.weight)[0],
                       qmodel.excite.weight_quantizer.integer_codes(qmodel.excite.weight)[0])


ACTIVATION_QUANTIZERS = {
    'dual_region': lambda bits: DualRegionQuantizer(bits),
    'dual_region_pwlq': lambda bits: DualRegionQuantizer(bits, levels='pwlq'),
    'minmax': lambda bits: UniformQuantizer(bits, 'minmax'),
    'percentile': lambda bits: UniformQuantizer(bits, 'percentile'),
    'mse': lambda bits: UniformQuantizer(bits, 'mse'),
}


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), kind=st.sampled_from(sorted(ACTIVATION_QUANTIZERS)), scale=st.floats(1e2, 1e6),
       seed=st.integers(0, 2 ** 16))
def test_activation_quantizers_on_values_up_to_1e6(bits, kind, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(2, 4, 16, 16, generator=generator) * 3
    flat = values.view(-1)
    flat[:40] = torch.linspace(-scale, scale, 40)      # rare outliers reaching +-scale
    quantizer = ACTIVATION_QUANTIZERS[kind](bits)
    quantizer.observe(values)
    quantizer.initialize()
    grid = quantizer.grid()
    x = torch.linspace(-1.2 * scale, 1.2 * scale, 20001)
    with torch.no_grad():
        y = quantizer(x)
        again = quantizer(y)
    assert torch.isfinite(y).all()
    # The integer path (codes, then the level table) gives the fake-quantized values exactly.
    assert torch.equal(decode_input(grid, x), y)
    # Monotone, and idempotent up to float rounding at this magnitude (pwlq: one dense step, by design).
    slack = 1e-6 * scale + (float(grid.middle.step.detach()) if kind == 'dual_region_pwlq' else 0.0)
    assert bool((y[1:] >= y[:-1] - slack).all())
    assert float((again - y).abs().max()) <= slack
    lower, upper = float(quantizer.lower.detach()), float(quantizer.upper.detach())
    inside = (x >= lower) & (x <= upper)
    largest_step = max(float(region.step.detach()) for region in grid.regions())
    assert float((y - x)[inside].abs().max()) <= largest_step / 2 * (1 + 1e-4) + 1e-6 * scale


# -- 2. roles from the graph ---------------------------------------------------------------------------
class PaddedWindowSR(nn.Module):
    """Reflect-pads its input to a multiple of the window, runs head/body/upsampler, crops the output back."""

    def __init__(self, window: int = 8):
        super().__init__()
        self.window = window
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.up = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x):
        height, width = x.shape[-2:]
        x = F.pad(x, (0, (-width) % self.window, 0, (-height) % self.window), mode='reflect')
        features = self.head(x)
        features = features + self.body(features)
        return F.pixel_shuffle(self.up(features), 2)[..., :2 * height, :2 * width]


def test_padded_input_keeps_body_layers_at_body_bits():
    plans = {p.name: p for p in plan_layers(PaddedWindowSR(), OAQConfig(), torch.rand(1, 3, 13, 13))}
    assert plans['head'].role == 'first' and plans['up'].role == 'last'
    for name in ('body.0', 'body.2', 'body.4'):
        assert plans[name].role == 'body', (name, plans[name].role)
        assert (plans[name].w_bits, plans[name].a_bits) == (4, 4)


class ChannelsLastTokens(nn.Module):
    """Linear layers on (N, H, W, C) tokens between a conv head and a pixel-shuffle upsampler."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))
        self.mix = nn.Linear(channels, channels)
        self.up = nn.Conv2d(channels, 12, 3, padding=1)

    def forward(self, x):
        tokens = self.head(x).permute(0, 2, 3, 1)
        tokens = tokens + self.mlp(tokens)
        tokens = self.mix(tokens)
        return F.pixel_shuffle(self.up(tokens.permute(0, 3, 1, 2)), 2)


def test_channels_last_linear_tokens_plan_does_not_depend_on_the_patch_size():
    torch.manual_seed(0)
    model = ChannelsLastTokens().eval()
    plans = [[p.to_dict() for p in plan_layers(model, OAQConfig(), torch.rand(1, 3, size, size))]
             for size in (48, 96, 128)]
    assert plans[0] == plans[1] == plans[2]
    roles = {p['name']: p['role'] for p in plans[0]}
    assert roles == {'head': 'first', 'mlp.0': 'body', 'mlp.2': 'body', 'mix': 'body', 'up': 'last'}


class FreedTemporaries(nn.Module):
    """Residual convs whose outputs are freed mid-forward, and an upsampler behind a functional activation."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.up = nn.Conv2d(8, 32, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        features = self.head(x)
        for conv in self.body:
            residual = conv(features)
            features = features + residual
        upsampled = self.up(features)
        del residual  # frees a body conv's output: a later tensor may take its id
        return self.tail(F.pixel_shuffle(F.leaky_relu(upsampled, 0.1), 2))


def test_repeated_conversions_give_identical_plans():
    torch.manual_seed(0)
    model = FreedTemporaries().eval()
    x = torch.rand(1, 3, 12, 12)
    plans = [[p.to_dict() for p in convert(model, OAQConfig(), x).oaq_plans] for _ in range(5)]
    assert all(plan == plans[0] for plan in plans)
    roles = {p['name']: p['role'] for p in plans[0]}
    assert roles == {'head': 'first', 'body.0': 'body', 'body.1': 'body', 'body.2': 'body', 'up': 'upsampler',
                     'tail': 'last'}


class DownUpBody(nn.Module):
    """A body block that downsamples (strided conv, pooling) and interpolates back, as enhanced spatial
    attention does: its layers are not an upsampling tail."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 8, 3, stride=2)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 8, 1)
        self.up = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x):
        features = self.head(x)
        low = self.inner(F.max_pool2d(self.reduce(features), 3, stride=2))
        gate = torch.sigmoid(self.expand(F.interpolate(low, size=features.shape[-2:], mode='bilinear')))
        return F.pixel_shuffle(self.up(features * gate), 2)


def test_down_and_up_inside_a_block_is_not_an_upsampler():
    roles = {p.name: p.role for p in plan_layers(DownUpBody(), OAQConfig(), torch.rand(1, 3, 27, 27))}
    assert roles == {'head': 'first', 'reduce': 'body', 'inner': 'body', 'expand': 'body', 'up': 'last'}


# -- 3. batch-norm folding ------------------------------------------------------------------------------
class ConvBatchNormNet(nn.Module):
    """Conv+BN (no bias), conv+BN (bias) in a residual, a grouped transposed conv+BN, and a BN that must
    stay (its conv's output is also used elsewhere)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.shared_conv = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)
        self.deconv = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, groups=2)
        self.deconv_bn = nn.BatchNorm2d(6)
        self.tail = nn.Conv2d(6, 3, 3, padding=1)
        generator = torch.Generator().manual_seed(1)
        for bn in (self.head[1], self.bn, self.shared_bn, self.deconv_bn):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.randn(bn.num_features, generator=generator))
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=generator))

    def forward(self, x):
        features = self.head(x)
        features = features + self.bn(self.conv(features))
        mixed = self.shared_conv(features)
        features = self.shared_bn(mixed) + mixed
        return self.tail(torch.relu(self.deconv_bn(self.deconv(features))))


def test_batchnorm_is_folded_exactly_and_reported():
    torch.manual_seed(0)
    model = ConvBatchNormNet().eval()
    x = torch.rand(2, 3, 10, 10)
    qmodel = convert(model, OAQConfig(), x[:1])
    folded = {p.name: p.folded_batchnorm for p in qmodel.oaq_plans if p.folded_batchnorm}
    assert folded == {'head.0': 'head.1', 'conv': 'bn', 'deconv': 'deconv_bn'}
    kinds = {name: type(module) for name, module in qmodel.named_modules()}
    assert kinds['head.1'] is nn.Identity and kinds['bn'] is nn.Identity and kinds['deconv_bn'] is nn.Identity
    assert kinds['shared_bn'] is nn.BatchNorm2d
    assert qmodel.head[0].module.bias is not None
    set_mode(qmodel, 'float')
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)
    # The weight grid is set on the folded weight.
    assert torch.allclose(qmodel.conv.weight_quantizer.clip.reshape(-1),
                          qmodel.conv.module.weight.abs().amax(dim=(1, 2, 3)), rtol=0.9)


def test_folded_model_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ConvBatchNormNet().eval()
    config = OAQConfig.from_dict({**CALIBRATION_ONLY, 'w_bits': 8, 'a_bits': 8})
    qmodel = quantize(model, [torch.rand(2, 3, 10, 10)], config)
    path = save_quantized(qmodel, tmp_path / 'bn.pth', config)
    loaded = load_quantized(path, model=ConvBatchNormNet())
    x = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
        assert relative_error(qmodel(x), model(x)) < 1e-3


def test_training_mode_batchnorm_of_the_float_model_is_left_untouched():
    model = ConvBatchNormNet().train()
    state = copy.deepcopy(model.state_dict())
    convert(model, OAQConfig(), torch.rand(1, 3, 10, 10))
    assert model.training and isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert not any(isinstance(m, QuantLayer) for m in model.modules())


# -- 4. generic attention, and what stays in float ------------------------------------------------------
class PlainAttention(nn.Module):
    """q·kᵀ with ``@`` and attn·v with ``torch.matmul``, as most attention code writes them."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (channels // self.heads) ** -0.5
        out = torch.matmul(attn.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class FusedAttention(nn.Module):
    """The fused ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, channels)


class ChannelAttention(nn.Module):
    """Transposed (channel) attention with ``einsum`` and a learned temperature."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x):
        gram = torch.einsum('bnc,bnd->bcd', x, x) * self.temperature
        return torch.einsum('bnc,bcd->bnd', x, gram.softmax(dim=-1))


class GenericAttentionSR(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.head = nn.Conv2d(3, dim, 3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.plain = PlainAttention(dim)
        self.fused = FusedAttention(dim)
        self.channel = ChannelAttention()
        self.up = nn.Conv2d(dim, 12, 3, padding=1)

    def forward(self, x):
        features = self.head(x)
        batch, channels, height, width = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        tokens = tokens + self.plain(self.norm(tokens))
        tokens = tokens + self.fused(tokens)
        tokens = tokens + self.channel(tokens)
        return F.pixel_shuffle(self.up(tokens.transpose(1, 2).reshape(batch, channels, height, width)), 2)


def attention_batches():
    generator = torch.Generator().manual_seed(3)
    return [torch.rand(2, 3, 8, 8, generator=generator) for _ in range(2)]


def test_generic_attention_matmuls_quantize_both_operands():
    from oaq_plugin.quant.attention import matmul_quantizers
    torch.manual_seed(0)
    model = GenericAttentionSR().eval()
    plans = {p.name: p for p in plan_layers(model, OAQConfig(), torch.rand(1, 3, 8, 8))}
    assert plans['plain'].kind == 'attention_matmuls' and plans['plain'].matmuls == ['matmul', 'matmul']
    assert plans['fused'].matmuls == ['scaled_dot_product_attention']
    assert plans['channel'].matmuls == ['einsum', 'einsum'] and plans['channel'].a_bits == 4
    qmodel = quantize(model, attention_batches(), {**CALIBRATION_ONLY, 'w_bits': 8, 'a_bits': 8})
    names = [name for name, _, _ in matmul_quantizers(qmodel)]
    assert names == ['plain.quant_matmul0.left', 'plain.quant_matmul0.right', 'plain.quant_matmul1.left',
                     'plain.quant_matmul1.right', 'fused.quant_sdpa0_qk.q', 'fused.quant_sdpa0_qk.k',
                     'fused.quant_sdpa0_av.attn', 'fused.quant_sdpa0_av.v', 'channel.quant_matmul0.left',
                     'channel.quant_matmul0.right', 'channel.quant_matmul1.left', 'channel.quant_matmul1.right']
    assert all(quantizer.observed is not None and quantizer.bits == 8 for _, _, quantizer in matmul_quantizers(qmodel))
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        quantized = qmodel(x)
        assert relative_error(quantized, model(x)) < 1e-3
        # The operands really are quantized: the same network with its matmuls in float differs.
        for _, matmul, _ in matmul_quantizers(qmodel):
            matmul.set_mode('float')
        assert not torch.equal(qmodel(x), quantized)
        set_mode(qmodel, 'float')
        # In float mode the decomposed scaled dot-product attention equals the fused one to float rounding.
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(copy.deepcopy(qmodel)(x), qmodel(x))


def test_float_ops_and_macs_by_bits_account_for_every_multiply_add():
    torch.manual_seed(0)
    model = GenericAttentionSR().eval()
    x = torch.rand(1, 3, 8, 8)
    tokens, dim = 64, 16
    head = tokens * dim * 3 * 9
    up = tokens * 12 * dim * 9
    linears = tokens * (3 * dim * dim + dim * dim) + tokens * 3 * dim * dim
    attention = 2 * (2 * tokens * tokens * dim // 2) * 2 + 2 * tokens * dim * dim   # plain and fused, channel
    norm_and_temperature = tokens * dim + dim * dim
    quantized = convert(model, OAQConfig(), x).oaq_op_accounting
    assert quantized.macs_by_bits == {'A4A4': attention, 'W8A8': head + up, 'W4A4': linears,
                                      'float': norm_and_temperature}
    assert quantized.total_macs == sum(quantized.macs_by_bits.values())
    assert {(op.name, op.kind) for op in quantized.float_ops} == {('norm', 'layer_norm'), ('channel', 'mul')}
    left_float = convert(model, OAQConfig(quantize_generic_attention=False), x).oaq_op_accounting
    assert set(left_float.macs_by_bits) == {'float', 'W8A8', 'W4A4'}
    ops = {(op.name, op.kind): op for op in left_float.float_ops}
    assert ops[('plain', 'matmul')].macs == 2 * tokens * tokens * dim
    assert ops[('fused', 'scaled_dot_product_attention')].macs == 2 * tokens * tokens * dim
    assert ops[('channel', 'einsum')].macs == 2 * tokens * dim * dim
    assert abs(sum(op.share for op in left_float.float_ops) - left_float.share('float')) < 1e-9
    excluded = convert(model, OAQConfig(exclude=['plain*']), x)
    assert not any(name.startswith('plain.quant') for name, _ in excluded.named_modules())
    assert ('plain', 'matmul') in {(op.name, op.kind) for op in excluded.oaq_op_accounting.float_ops}
    assert ('plain.qkv', 'Linear') in {(op.name, op.kind) for op in excluded.oaq_op_accounting.float_ops}


def test_generic_attention_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GenericAttentionSR().eval()
    config = OAQConfig.from_dict(CALIBRATION_ONLY)
    qmodel = quantize(model, attention_batches(), config)
    path = save_quantized(qmodel, tmp_path / 'attention.pth', config)
    loaded = load_quantized(path, model=GenericAttentionSR())
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_report_lists_float_ops_macs_and_folds(tmp_path):
    import json

    from oaq_plugin.pipeline.io.report import RunReport
    from oaq_plugin.pipeline.run import run_pipeline
    torch.manual_seed(0)
    result = run_pipeline(ConvBatchNormNet().eval(), [torch.rand(2, 3, 10, 10)], OAQConfig.from_dict(CALIBRATION_ONLY))
    RunReport(tmp_path / 'oaq_report.json', result).write()
    report = json.loads((tmp_path / 'oaq_report.json').read_text())
    assert report['batchnorm_folds'] == {'head.0': 'head.1', 'conv': 'bn', 'deconv': 'deconv_bn'}
    assert [(op['name'], op['kind']) for op in report['float_ops']] == [('shared_bn', 'batch_norm')]
    assert set(report['macs_by_bits']) == {'W8A8', 'W4A4', 'float'}
    assert abs(sum(entry['share'] for entry in report['macs_by_bits'].values()) - 1.0) < 1e-9
    assert report['check']['fidelity_psnr'] is not None


class ChannelNorm(nn.Module):
    """A layer norm over channels written out, scaling by views of its parameters."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt((x - mean).pow(2).mean(1, keepdim=True) + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def test_a_norm_computing_with_views_of_its_parameters_is_a_float_op():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelNorm(8), nn.Conv2d(8, 3, 3, padding=1)).eval()
    accounting = convert(model, OAQConfig(), torch.rand(1, 3, 8, 8)).oaq_op_accounting
    assert {(op.name, op.kind, op.macs) for op in accounting.float_ops} == {('1', 'mul', 512), ('1', 'add', 512)}
