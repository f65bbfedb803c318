"""Model conversion: roles of the fully-quantized protocol, overrides, and the public entry point."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from oaq_plugin import NumericalError, OAQConfig, OAQError, quantize
from oaq_plugin.quant import DualRegionQuantizer, QuantLayer, UniformQuantizer, plan_layers

from layer_cases import CALIBRATION_ONLY


class TinySR(nn.Module):
    """head -> two residual convs -> conv feeding PixelShuffle -> conv at HR -> last conv."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.up = nn.Conv2d(8, 32, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.hr = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        f = self.head(x)
        f = f + self.body(f)
        return self.tail(torch.relu(self.hr(self.shuffle(self.up(f)))))


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, 12, 12, generator=g) for _ in range(n)]


def test_roles_and_bits_full_protocol():
    plans = {p.name: p for p in plan_layers(TinySR(), OAQConfig(), batches()[0][:1])}
    assert plans['head'].role == 'first' and plans['tail'].role == 'last'
    assert plans['up'].role == 'upsampler' and plans['hr'].role == 'upsampler'
    assert plans['body.0'].role == 'body'
    assert (plans['head'].w_bits, plans['head'].a_bits) == (8, 8)
    assert (plans['body.0'].w_bits, plans['body.0'].a_bits) == (4, 4)
    assert not plans['unused'].quantized


def test_float_ends_protocol_and_overrides():
    config = OAQConfig.from_dict({'protocol': 'float_ends', 'layer_bits': {'body.2': [6, 5], 'body.0': 'float'}})
    plans = {p.name: p for p in plan_layers(TinySR(), config, batches()[0][:1])}
    assert not plans['head'].quantized and not plans['tail'].quantized and not plans['up'].quantized
    assert (plans['body.2'].w_bits, plans['body.2'].a_bits) == (6, 5)
    assert not plans['body.0'].quantized


def test_quantize_leaves_float_model_untouched_and_wraps_layers():
    torch.manual_seed(0)
    model = TinySR().eval()
    before = copy.deepcopy(model.state_dict())
    qmodel = quantize(model, batches(), CALIBRATION_ONLY)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(not isinstance(m, QuantLayer) for m in model.modules())
    duals = [m for m in qmodel.modules() if isinstance(m, DualRegionQuantizer)]
    assert len(duals) == 6
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        w8a8 = quantize(model, batches(), {**CALIBRATION_ONLY, 'w_bits': 8, 'a_bits': 8})
        error_w8 = float((w8a8(x) - model(x)).abs().mean())
        error_w4 = float((qmodel(x) - model(x)).abs().mean())
    assert error_w8 < error_w4


def test_uniform_baselines_use_uniform_quantizers():
    qmodel = quantize(TinySR().eval(), batches(), {**CALIBRATION_ONLY, 'act_quantizer': 'percentile'})
    kinds = {type(m) for m in qmodel.modules() if isinstance(m, (DualRegionQuantizer, UniformQuantizer))}
    assert kinds == {UniformQuantizer}


def test_nan_in_calibration_names_the_layer():
    model = TinySR().eval()
    with torch.no_grad():
        model.body[0].weight[0, 0, 0, 0] = float('nan')
    with pytest.raises(NumericalError, match="'body.2'"):
        quantize(model, batches(), CALIBRATION_ONLY)


def test_model_that_cannot_run_is_refused_clearly():
    with pytest.raises(OAQError, match='example input'):
        quantize(TinySR().eval(), [torch.rand(2, 5, 12, 12)], CALIBRATION_ONLY)


def test_basicsr_edsr_roles():
    from basicsr.archs.edsr_arch import EDSR
    model = EDSR(3, 3, num_feat=16, num_block=2, upscale=4).eval()
    plans = {p.name: p for p in plan_layers(model, OAQConfig(), torch.rand(1, 3, 12, 12))}
    assert plans['conv_first'].role == 'first' and plans['conv_last'].role == 'last'
    assert plans['upsample.0'].role == 'upsampler' and plans['upsample.2'].role == 'upsampler'
    assert plans['body.0.conv1'].role == 'body'


def test_small_random_swinir_quantizes_linear_layers():
    from basicsr.archs.swinir_arch import SwinIR
    from oaq_plugin.pipeline.inference import run_padded
    from oaq_plugin.quant import QuantLinear
    torch.manual_seed(0)
    model = SwinIR(upscale=2, in_chans=3, img_size=16, window_size=4, img_range=1.0, depths=[2], embed_dim=12,
                   num_heads=[2], mlp_ratio=2, upsampler='pixelshuffle', resi_connection='1conv').eval()
    qmodel = quantize(model, [torch.rand(2, 3, 16, 16)], CALIBRATION_ONLY)
    plans = {p.name: p for p in qmodel.oaq_plans}
    assert plans['conv_first'].role == 'first' and plans['conv_last'].role == 'last'
    assert plans['upsample.0'].role == 'upsampler'
    linears = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.act_quantizer.bits == 4 for m in linears)
    x = torch.rand(1, 3, 14, 18)
    with torch.no_grad():
        out = run_padded(qmodel, x, scale=2, window=4)
        ref = run_padded(model, x, scale=2, window=4)
    assert out.shape == (1, 3, 28, 36) and torch.isfinite(out).all()
    assert float((out - ref).abs().mean()) < 0.1
