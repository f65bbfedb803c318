"""Low-bit checkpoints: packing, size, bit-exact round trip on every backend, corruption refused."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from layer_cases import CALIBRATION_ONLY, TinySR, quantized_tiny_sr, single_thread, tiny_sr_config  # noqa: F401
from oaq_plugin import DataError, OAQConfig, OAQError, quantize
from oaq_plugin.backends.select import to_backend
from oaq_plugin.pipeline.io import export
from oaq_plugin.pipeline.io.export import (float_size_bytes, load_quantized, pack_codes, quantized_size_bytes,
                                        read_quantized, save_quantized, unpack_codes)
from oaq_plugin.quant import convert


def compact_sr(feat: int = 64, num_conv: int = 8, upscale: int = 4) -> nn.Module:
    """An SRVGGNetCompact-like plain conv net: conv + PReLU stages and a pixel-shuffle tail."""
    layers = [nn.Conv2d(3, feat, 3, padding=1), nn.PReLU(feat)]
    for _ in range(num_conv):
        layers += [nn.Conv2d(feat, feat, 3, padding=1), nn.PReLU(feat)]
    layers += [nn.Conv2d(feat, 3 * upscale ** 2, 3, padding=1), nn.PixelShuffle(upscale)]
    return nn.Sequential(*layers).eval()


def outputs(qmodel, x, backends=('fake', 'reference')):
    with torch.no_grad():
        return {b: to_backend(qmodel, b)(x) for b in backends}


def test_pack_codes_layout():
    assert pack_codes(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]
    assert pack_codes(torch.tensor([200, 7], dtype=torch.uint8), 8).tolist() == [200, 7]
    assert pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b111001]


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_round_trip(bits, data):
    values = data.draw(st.lists(st.integers(0, 2 ** bits - 1), max_size=70))
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(values) * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, len(values)), codes)


def test_round_trip_is_bit_exact_on_every_backend(tmp_path):
    qmodel = quantized_tiny_sr(transposed_tail=True)
    config = tiny_sr_config()
    path = save_quantized(qmodel, tmp_path / 'tiny.pth', config, arch={'type': 'TinySR', 'transposed_tail': True})
    loaded = load_quantized(path, model=TinySR(transposed_tail=True))
    assert [p.to_dict() for p in loaded.oaq_plans] == [p.to_dict() for p in qmodel.oaq_plans]
    x = torch.rand(1, 3, 5, 6, generator=torch.Generator().manual_seed(3))
    before = outputs(qmodel, x, ('fake', 'reference', 'triton'))
    after = outputs(loaded, x, ('fake', 'reference', 'triton'))
    for backend in before:
        assert torch.equal(before[backend], after[backend]), backend
    to_backend(qmodel, 'fake')


class FoldsItsBranches(nn.Module):
    """A re-parameterized conv in eval mode, as SPAN's: every forward rewrites the conv's weight from its
    branches (here two), then runs it."""

    def __init__(self):
        super().__init__()
        self.branch_a = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.branch_b = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
        self.folded = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        with torch.no_grad():
            self.folded.weight.copy_(self.branch_a + self.branch_b)
        return self.shuffle(self.tail(torch.relu(self.body(torch.relu(self.folded(x))))))


@pytest.mark.parametrize('learned', [False, True])
def test_learned_rounding_survives_the_round_trip_of_a_layer_that_rewrites_its_weight(tmp_path, learned):
    torch.manual_seed(0)
    model = FoldsItsBranches().eval()
    batches = [torch.rand(2, 3, 12, 12) for _ in range(2)]
    config = OAQConfig.from_dict({**CALIBRATION_ONLY, 'w_bits': 4, 'a_bits': 8})
    qmodel = quantize(model, batches, config, progress=False)
    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        qmodel(x)  # the folded weight is in place
    if learned:
        # Every weight of every layer rounds the other way from nearest, as a learned rounding may choose.
        for layer in (qmodel.folded, qmodel.body, qmodel.tail):
            quantizer = layer.weight_quantizer
            position = quantizer.grid_position(layer.weight.detach(), quantizer.clip.detach())
            quantizer.set_rounding((position - position.floor() < 0.5).to(torch.uint8))
    path = save_quantized(qmodel, tmp_path / 'folded.pth', config)
    assert (read_quantized(path)['layers']['folded']['rounding'] is not None) == learned
    loaded = load_quantized(path, model=FoldsItsBranches().eval())
    before, after = outputs(qmodel, x), outputs(loaded, x)
    for backend in before:
        assert torch.equal(before[backend], after[backend]), backend


@pytest.mark.parametrize('options', [
    {'w_bits': 3, 'a_bits': 5, 'weight_granularity': 'tensor', 'weight_grid': 'zero', 'levels': 'pwlq'},
    {'w_bits': 6, 'a_bits': 2, 'act_quantizer': 'minmax', 'protocol': 'float_ends'},
])
def test_round_trip_other_widths_and_grids(tmp_path, options):
    model = compact_sr(feat=8, num_conv=2, upscale=2)
    config = OAQConfig.from_dict({**CALIBRATION_ONLY, **options})
    qmodel = quantize(model, [torch.rand(1, 3, 6, 6)], config)
    with torch.no_grad():
        model[2].weight[0].zero_()  # an all-zero channel: its clip collapses to the minimum step
        qmodel[2].module.weight[0].zero_()
    path = save_quantized(qmodel, tmp_path / 'q.pth', config)
    loaded = load_quantized(path, model=compact_sr(feat=8, num_conv=2, upscale=2))
    x = torch.rand(2, 3, 5, 4)
    before, after = outputs(qmodel, x), outputs(loaded, x)
    for backend in before:
        assert torch.equal(before[backend], after[backend]), backend


def test_w4_file_is_small(tmp_path):
    model = compact_sr()
    config = OAQConfig.from_dict({**CALIBRATION_ONLY, 'w_bits': 4, 'a_bits': 4})
    qmodel = convert(model, config, torch.rand(1, 3, 8, 8))
    path = save_quantized(qmodel, tmp_path / 'w4.pth', config)
    torch.save(model.state_dict(), tmp_path / 'fp32.pth')
    fp32_file = os.path.getsize(tmp_path / 'fp32.pth')
    assert os.path.getsize(path) < 0.3 * fp32_file
    assert quantized_size_bytes(qmodel) < 0.3 * float_size_bytes(model)
    assert float_size_bytes(model) == sum(t.numel() * 4 for t in model.state_dict().values())


def test_file_holds_plain_data_only(tmp_path):
    qmodel = quantized_tiny_sr()
    config = tiny_sr_config()
    arch = {'type': 'TinySR', 'feat': 16}
    path = save_quantized(qmodel, tmp_path / 'plain.pth', config, arch=arch)
    payload = torch.load(path, weights_only=True)
    assert payload['arch'] == arch
    assert OAQConfig.from_dict(payload['config']) == config
    assert payload['plans'] == [p.to_dict() for p in qmodel.oaq_plans]
    entry = payload['layers']['body.0']
    assert entry['codes'].dtype == torch.uint8 and entry['w_bits'] == 4
    assert entry['codes'].numel() == qmodel.body[0].weight.numel() // 2
    assert set(entry['scalars']) >= {'act_quantizer.lower', 'act_quantizer.upper', 'act_quantizer.breakpoint'}
    assert not any(k.startswith('body.0.') for k in payload['float_state'])


def test_load_through_builder(tmp_path):
    path = save_quantized(quantized_tiny_sr(), tmp_path / 'b.pth', tiny_sr_config(), arch={'type': 'TinySR'})
    seen = []

    def builder(arch):
        seen.append(arch)
        return TinySR()
    loaded = load_quantized(path, builder=builder)
    assert seen == [{'type': 'TinySR'}]
    assert hasattr(loaded, 'oaq_plans')
    with pytest.raises(OAQError, match='builder'):
        load_quantized(path)


def test_wrong_network_is_refused(tmp_path):
    path = save_quantized(quantized_tiny_sr(), tmp_path / 'w.pth', tiny_sr_config())
    with pytest.raises(DataError, match='w.pth'):
        load_quantized(path, model=TinySR(feat=8))


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_file_is_refused(tmp_path):
    qmodel = quantized_tiny_sr()
    path = save_quantized(qmodel, tmp_path / 'c.pth', tiny_sr_config())
    codes = read_quantized(path)['layers']['body.0']['codes']
    offset = path.read_bytes().find(codes.numpy().tobytes())
    assert offset > 0
    _flip_byte(path, offset + 3)
    with pytest.raises(DataError, match='c.pth'):
        load_quantized(path, model=TinySR())

    path = save_quantized(qmodel, tmp_path / 't.pth', tiny_sr_config())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match='t.pth'):
        read_quantized(path)

    foreign = tmp_path / 'f.pth'
    torch.save({'params': torch.zeros(3)}, foreign)
    with pytest.raises(DataError, match='not a quantized checkpoint'):
        read_quantized(foreign)
    with pytest.raises(DataError, match='not found'):
        read_quantized(tmp_path / 'missing.pth')


def test_save_is_atomic(tmp_path, monkeypatch):
    qmodel = quantized_tiny_sr()
    path = save_quantized(qmodel, tmp_path / 'a.pth', tiny_sr_config())
    original = path.read_bytes()

    def failing_save(obj, stream):
        stream.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(export.torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        save_quantized(qmodel, path, tiny_sr_config())
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ['a.pth']


@pytest.mark.slow
def test_real_checkpoint_sizes_and_round_trip(shared, tmp_path):
    from oaq_plugin.compat import install_basicsr_compat
    install_basicsr_compat()
    from basicsr.archs.srvgg_arch import SRVGGNetCompact

    checkpoint = shared / 'weights' / 'SRVGGNetCompact' / 'realesr-animevideov3.pth'
    if not checkpoint.is_file():
        pytest.skip(f'{checkpoint} not found')
    arch = dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4, act_type='prelu')
    model = SRVGGNetCompact(**arch).eval()
    model.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=True)['params'])
    config = OAQConfig.from_dict({**CALIBRATION_ONLY, 'w_bits': 4, 'a_bits': 4})
    qmodel = convert(model, config, torch.rand(1, 3, 8, 8))
    path = save_quantized(qmodel, tmp_path / 'srvgg_w4.pth', config, arch={'type': 'SRVGGNetCompact', **arch})
    assert os.path.getsize(path) < 0.3 * os.path.getsize(checkpoint)
    loaded = load_quantized(path, builder=lambda a: SRVGGNetCompact(**{k: v for k, v in a.items() if k != 'type'}))
    x = torch.rand(1, 3, 6, 6)
    assert torch.equal(outputs(qmodel, x, ('fake',))['fake'], outputs(loaded, x, ('fake',))['fake'])


def test_arch_options_are_stored_as_plain_data(tmp_path):
    from collections import OrderedDict
    arch = OrderedDict(type='TinySR', sizes=(1, 2), nested=OrderedDict(a=1.5))
    path = save_quantized(quantized_tiny_sr(), tmp_path / 'o.pth', tiny_sr_config(), arch=arch)
    assert read_quantized(path)['arch'] == {'type': 'TinySR', 'sizes': [1, 2], 'nested': {'a': 1.5}}
    with pytest.raises(OAQError, match='arch.bad'):
        save_quantized(quantized_tiny_sr(), tmp_path / 'x.pth', tiny_sr_config(), arch={'bad': object()})
