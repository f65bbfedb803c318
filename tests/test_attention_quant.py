"""Quantized attention matmuls (``quantize_attention``) on a small random-weight SwinIR."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oaq_plugin import OAQConfig, UnsupportedLayerError, quantize
from oaq_plugin.config import SearchConfig
from oaq_plugin.backends.select import backend_summary, to_backend
from oaq_plugin.pipeline.io.export import load_quantized, read_quantized, save_quantized
from oaq_plugin.pipeline.stages.finetune import finetune
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.pipeline.io.report import layer_rows
from oaq_plugin.pipeline.stages.search import search
from oaq_plugin.quant import (DualRegionQuantizer, QuantMatmul, QuantWindowAttention, convert, matmul_quantizers,
                              quant_matmuls, set_mode)
from oaq_plugin.quant.convert import make_act_quantizer
from layer_cases import CALIBRATION_ONLY
from tiny_sr import single_thread  # noqa: F401 (autouse fixture)

WINDOW = 4


def small_swinir() -> nn.Module:
    from basicsr.archs.swinir_arch import SwinIR
    torch.manual_seed(0)
    return SwinIR(upscale=2, in_chans=3, img_size=16, window_size=WINDOW, img_range=1.0, depths=[2], embed_dim=12,
                  num_heads=[2], mlp_ratio=2, upsampler='pixelshuffle', resi_connection='1conv').eval()


def calib_batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(2, 3, 16, 16, generator=generator) for _ in range(2)]


def fidelity_psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float((output.clamp(0, 1) - reference.clamp(0, 1)).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))


@pytest.fixture(scope='module')
def swinir():
    return small_swinir()


@pytest.fixture(scope='module')
def w4a4_pair(swinir):
    """The same W4A4 quantization without and with quantized attention matmuls."""
    options = {**CALIBRATION_ONLY, 'w_bits': 4, 'a_bits': 4}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse single_thread fixture
    try:
        plain = quantize(swinir, calib_batches(), options)
        with_attention = quantize(swinir, calib_batches(), {**options, 'quantize_attention': True})
    finally:
        torch.set_num_threads(threads)
    return plain, with_attention


@pytest.mark.parametrize('shift', [0, 2], ids=['no_mask', 'shifted_window_mask'])
def test_float_mode_equals_the_float_module(shift):
    from basicsr.archs.swinir_arch import SwinTransformerBlock
    torch.manual_seed(1)
    block = SwinTransformerBlock(dim=12, input_resolution=(8, 8), num_heads=2, window_size=WINDOW,
                                 shift_size=shift).eval()
    mask = block.attn_mask
    assert (mask is None) == (shift == 0)
    wrapped = QuantWindowAttention(block.attn, lambda: make_act_quantizer('dual_region', 4), name='attn')
    set_mode(wrapped, 'float')
    x = torch.randn(2 * 4, WINDOW * WINDOW, 12)
    with torch.no_grad():
        assert torch.equal(wrapped(x, mask=mask), block.attn(x, mask=mask))
    assert set(dict(wrapped.named_parameters())) >= set(dict(block.attn.named_parameters()))


def test_whole_network_in_float_mode_is_exact(swinir):
    qmodel = convert(swinir, OAQConfig.from_dict({'quantize_attention': True}), torch.rand(1, 3, 16, 16))
    set_mode(qmodel, 'float')
    # 16x16 uses the stored shifted-window mask, 12x20 computes one for its size.
    for shape in ((1, 3, 16, 16), (1, 3, 12, 20)):
        x = torch.rand(*shape)
        with torch.no_grad():
            assert torch.equal(qmodel(x), swinir(x))


def test_one_quantizer_per_operand_calibrated(swinir, w4a4_pair):
    from basicsr.archs.swinir_arch import WindowAttention
    _, qmodel = w4a4_pair
    attention_blocks = sum(isinstance(m, WindowAttention) for m in swinir.modules())
    quantizers = matmul_quantizers(qmodel)
    assert attention_blocks == 2 and len(quantizers) == 4 * attention_blocks
    names = {name for name, _, _ in quantizers}
    assert 'layers.0.residual_group.blocks.0.attn.matmul_qk.q' in names
    assert 'layers.0.residual_group.blocks.1.attn.matmul_av.attn' in names
    for name, matmul, quantizer in quantizers:
        assert isinstance(quantizer, DualRegionQuantizer) and quantizer.bits == 4
        assert matmul.mode == 'quant' and quantizer.observer.num_batches == 2 and quantizer.observed is not None
        lower, upper = float(quantizer.lower), float(quantizer.upper)
        if name.endswith('.attn'):
            assert 0.0 <= lower < upper <= 1.0, name  # softmax output: one-signed
        else:
            assert lower < 0.0 < upper, name
    # The linear layers of the attention keep their names and stay quantized layers.
    plans = {plan.name for plan in qmodel.oaq_plans if plan.quantized}
    assert 'layers.0.residual_group.blocks.0.attn.qkv' in plans
    assert type(qmodel.get_submodule('layers.0.residual_group.blocks.0.attn.qkv')).__name__ == 'QuantLinear'


def test_w8a8_is_close_and_w4a4_attention_changes_the_output(swinir, w4a4_pair):
    w8a8 = quantize(swinir, calib_batches(), {**CALIBRATION_ONLY, 'w_bits': 8, 'a_bits': 8, 'quantize_attention': True})
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    plain, with_attention = w4a4_pair
    with torch.no_grad():
        reference = swinir(x)
        assert fidelity_psnr(w8a8(x), reference) > 40.0
        out_plain, out_attention = plain(x), with_attention(x)
        assert not torch.equal(out_plain, out_attention)
        # Calibration sees float inputs, so only the matmul operands differ between the two models.
        for _, matmul in quant_matmuls(with_attention):
            matmul.set_mode('float')
        try:
            assert torch.equal(with_attention(x), out_plain)
        finally:
            set_mode(with_attention, 'quant')


def test_report_rows_and_backends(w4a4_pair):
    _, qmodel = w4a4_pair
    rows = {row['name']: row for row in layer_rows(qmodel)}
    row = rows['layers.0.residual_group.blocks.0.attn.matmul_av.v']
    assert row['kind'] == 'matmul' and row['a_bits'] == 4 and row['w_bits'] is None and row['backend'] == 'fake'
    assert rows['layers.0.residual_group.blocks.0.attn.qkv']['kind'] == 'Linear'
    x = torch.rand(1, 3, 16, 16)
    try:
        with torch.no_grad():
            fake = qmodel(x)
            to_backend(qmodel, 'reference')
            reference = qmodel(x)
        summary = backend_summary(qmodel)
        assert summary['layers.0.residual_group.blocks.0.attn.matmul_qk'] == 'fake'
        assert summary['layers.0.residual_group.blocks.0.attn.qkv'] == 'reference'
        # The integer reference may round a value on a step boundary the other way, as for any layer.
        assert float((fake - reference).abs().max()) < 1e-3
    finally:
        to_backend(qmodel, 'fake')


def test_export_round_trip_rebuilds_the_matmuls(swinir, w4a4_pair, tmp_path):
    _, qmodel = w4a4_pair
    config = OAQConfig.from_dict({**CALIBRATION_ONLY, 'quantize_attention': True})
    path = save_quantized(qmodel, tmp_path / 'swinir.pth', config)
    assert len(read_quantized(path)['matmuls']) == 8
    loaded = load_quantized(path, model=swinir)
    assert len(quant_matmuls(loaded)) == 4
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_search_and_finetune_run_with_quantized_matmuls(swinir):
    options = {**CALIBRATION_ONLY, 'quantize_attention': True,
               'finetune': {'epochs': 3, 'iters_per_epoch': 1, 'batch_size': 1, 'patch_size': 16, 'tap_samples': 1}}
    config = OAQConfig.from_dict(options)
    qmodel = quantize(swinir, calib_batches(), config)
    tiny_search = config.replace(search=SearchConfig(grid_size=2, refine_rounds=0, num_samples=1, window=4,
                                                     weight_clip=False))
    report = search(qmodel, calib_batches(), tiny_search)
    assert report.layers and all(matmul.mode == 'quant' for _, matmul in quant_matmuls(qmodel))
    before = {name: (float(q.upper), float(q.breakpoint)) for name, _, q in matmul_quantizers(qmodel)}
    finetune(swinir, qmodel, PatchSource.from_batches(calib_batches()), config)
    after = {name: (float(q.upper), float(q.breakpoint)) for name, _, q in matmul_quantizers(qmodel)}
    assert any(before[name][0] != after[name][0] for name in before)  # act_bounds epoch
    assert any(before[name][1] != after[name][1] for name in before)  # breakpoint epoch
    with torch.no_grad():
        assert torch.isfinite(qmodel(torch.rand(1, 3, 16, 16))).all()


def test_exclude_leaves_an_attention_in_float_and_networks_without_attention_are_refused(swinir):
    config = OAQConfig.from_dict({'quantize_attention': True, 'exclude': ['*.blocks.1.attn']})
    qmodel = convert(swinir, config, torch.rand(1, 3, 16, 16))
    assert [name for name, _ in quant_matmuls(qmodel)] == ['layers.0.residual_group.blocks.0.attn.matmul_qk',
                                                           'layers.0.residual_group.blocks.0.attn.matmul_av']
    assert all(isinstance(m, QuantMatmul) for _, m in quant_matmuls(qmodel))
    with pytest.raises(UnsupportedLayerError, match='quantize_attention: false'):
        convert(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)), OAQConfig(quantize_attention=True),
                torch.rand(1, 3, 8, 8))


def test_block_reconstruction_learns_the_attention_operand_quantizers(swinir):
    options = {**CALIBRATION_ONLY, 'w_bits': 4, 'a_bits': 4, 'quantize_attention': True,
               'reconstruction': {'enabled': True, 'iterations': 20, 'num_samples': 4, 'patch_size': 16,
                                  'batch_size': 2, 'max_layers': 4},
               'distillation': {'enabled': False}}
    from oaq_plugin.pipeline.run import run_pipeline
    before = quantize(swinir, calib_batches(), {**options, 'reconstruction': {'enabled': False},
                                                 'distillation': {'enabled': False}})
    result = run_pipeline(swinir, calib_batches(), options)
    names = [block.name for block in result.reports['reconstruction'].blocks]
    # Each Swin transformer block (4 Linear layers and its attention matmuls) is one block.
    assert 'layers.0.residual_group.blocks.0' in names and 'layers.0.residual_group.blocks.1' in names
    kept = {block.name for block in result.reports['reconstruction'].blocks if block.kept}
    assert 'layers.0.residual_group.blocks.0' in kept
    learned = {name: quantizer for name, _, quantizer in matmul_quantizers(result.model)}
    initial = {name: quantizer for name, _, quantizer in matmul_quantizers(before)}
    changed = [name for name in learned if name.startswith('layers.0.residual_group.blocks.0.')
               and float(learned[name].upper) != float(initial[name].upper)]
    assert changed
