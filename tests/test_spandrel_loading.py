"""``oaq_plugin.load_sr_model``: checkpoints spandrel recognises, BasicSR arch specs, zoo names, and the one-line
errors for everything else."""
from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch import nn

from spandrel_tiny import CASES, SCALE, save_random_instance
from tiny_sr import single_thread  # noqa: F401 - autouse: one torch thread, as on a busy machine

import oaq_plugin
from oaq_plugin.errors import DataError, OAQError
from oaq_plugin.loading import CheckpointError, load_sr_model, read_state_dict


def _reference(case: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case][1]().eval()


@pytest.mark.parametrize('case', ['rcan', 'swinir'])
def test_checkpoint_is_recognised_and_loaded_exactly(case, tmp_path):
    path = save_random_instance(case, tmp_path)
    model = oaq_plugin.load_sr_model(path)
    assert model.architecture == CASES[case][0]
    assert (model.scale, model.input_channels, model.channel_layout, model.input_range) == (SCALE, 3, 'RGB', (0., 1.))
    assert model.network_g == {'type': 'Spandrel', 'checkpoint': str(path.resolve())}
    assert not model.module.training
    x = torch.rand(1, 3, 16, 20)
    with torch.no_grad():
        assert torch.equal(model.module(x), _reference(case)(x.clone()))


def test_input_is_never_modified(tmp_path):
    """spandrel's RCAN scales its input in place; the pipeline feeds the same batches many times."""
    model = load_sr_model(save_random_instance('rcan', tmp_path))
    x = torch.rand(2, 3, 12, 12)
    before = x.clone()
    with torch.no_grad():
        first = model.module(x)
        second = model.module(x)
    assert torch.equal(x, before)
    assert torch.equal(first, second)


def test_wrapped_prefixed_and_safetensors_checkpoints(tmp_path):
    from safetensors.torch import save_file
    state = _reference('compact').state_dict()
    torch.save({'params_ema': {f'module.{k}': v for k, v in state.items()}, 'iter': 3}, tmp_path / 'ema.pth')
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'plain.safetensors'))
    x = torch.rand(1, 3, 10, 10)
    expected = _reference('compact')(x)
    for name in ('ema.pth', 'plain.safetensors'):
        model = load_sr_model(tmp_path / name)
        assert model.architecture == 'Compact'
        with torch.no_grad():
            assert torch.equal(model.module(x), expected), name


def test_random_bytes_get_one_line_without_torch_advice(tmp_path):
    path = tmp_path / 'model.pth'
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as caught:
        load_sr_model(path)
    message = str(caught.value)
    assert 'is not a checkpoint' in message and str(path) in message
    assert '\n' not in message and 'weights_only' not in message


def test_truncated_checkpoint_and_pickled_objects_get_one_line(tmp_path):
    good = save_random_instance('compact', tmp_path)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:2000])
    torch.save({'params': _reference('compact').state_dict(), 'args': argparse.Namespace(lr=1)}, tmp_path / 'obj.pth')
    for path, expected in ((truncated, 'is not a loadable PyTorch checkpoint'), (tmp_path / 'obj.pth', 'argparse')):
        with pytest.raises(CheckpointError) as caught:
            load_sr_model(path)
        message = str(caught.value)
        assert expected in message and '\n' not in message
        assert 'weights_only=False' not in message


def test_unknown_architecture_names_what_spandrel_said(tmp_path):
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.my_first = nn.Conv2d(3, 8, 3, padding=1)
            self.my_last = nn.Conv2d(8, 12, 3, padding=1)

        def forward(self, x):
            return nn.functional.pixel_shuffle(self.my_last(self.my_first(x)), 2)

    torch.save(Unknown().state_dict(), tmp_path / 'unknown.pth')
    with pytest.raises(CheckpointError) as caught:
        load_sr_model(tmp_path / 'unknown.pth')
    message = str(caught.value)
    assert 'spandrel 0.4.2 does not recognise' in message and 'UnsupportedModelError' in message
    assert 'my_first.weight' in message and '\n' not in message


def test_wrong_scale_and_missing_file(tmp_path):
    path = save_random_instance('compact', tmp_path)
    with pytest.raises(OAQError, match='is a x2 network .*scale 4 was asked'):
        load_sr_model(path, scale=4)
    with pytest.raises(DataError, match='no such checkpoint file'):
        load_sr_model(tmp_path / 'absent.pth')
    with pytest.raises(DataError, match="did you mean 'imdn_x4'"):
        load_sr_model('imdn_x5')


def test_basicsr_arch_by_name_with_weights(tmp_path):
    spec = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 2}
    bare = load_sr_model(spec)
    assert (bare.architecture, bare.scale, bare.source, bare.network_g) == ('EDSR', 2, 'basicsr:EDSR', spec)
    torch.save({'params': bare.module.state_dict()}, tmp_path / 'edsr.pth')
    loaded = load_sr_model(spec, checkpoint=tmp_path / 'edsr.pth')
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), bare.module(x))
    with pytest.raises(CheckpointError, match='does not fit EDSR'):
        load_sr_model(dict(spec, num_feat=16), checkpoint=tmp_path / 'edsr.pth')
    with pytest.raises(OAQError, match="no BasicSR arch named 'EDSRR' \\(did you mean 'EDSR'"):
        load_sr_model({'type': 'EDSRR'})


def test_spandrel_arch_in_basicsr_registry(tmp_path):
    from oaq_plugin.basicsr_plugin.registration import build_arch
    from oaq_plugin.basicsr_plugin.spandrel_arch import loaded_from, network_options
    path = save_random_instance('rcan', tmp_path)
    net = build_arch({'type': 'Spandrel', 'checkpoint': str(path)})
    assert type(net).__name__ == 'RCAN' and loaded_from(net, path)
    options = network_options({'network_g': {'type': 'Spandrel'}, 'path': {'pretrain_network_g': str(path)},
                               'scale': 2})
    assert options == {'type': 'Spandrel', 'checkpoint': str(path), 'scale': 2}
    with pytest.raises(OAQError, match='is a x2 network'):
        build_arch(dict(options, scale=4))
    with pytest.raises(OAQError, match='path.pretrain_network_g'):
        network_options({'network_g': {'type': 'Spandrel'}, 'path': {}})


def test_read_state_dict_with_param_key(tmp_path):
    state = _reference('compact').state_dict()
    torch.save({'params': state, 'params_ema': state}, tmp_path / 'both.pth')
    assert set(read_state_dict(tmp_path / 'both.pth', 'params')) == set(state)
    with pytest.raises(CheckpointError, match="no 'weights' entry"):
        read_state_dict(tmp_path / 'both.pth', 'weights')


def test_zoo_name(shared):
    model = load_sr_model('zoo:srvgg_x4')
    assert (model.architecture, model.scale, model.source) == ('SRVGGNetCompact', 4, 'zoo:srvgg_x4')
    assert model.network_g['type'] == 'SRVGGNetCompact'


def test_real_compact_checkpoint_through_spandrel(shared):
    """The released Real-ESRGAN Compact checkpoint: spandrel's Compact equals BasicSR's SRVGGNetCompact."""
    path = shared / 'weights/SRVGGNetCompact/realesr-animevideov3.pth'
    model = load_sr_model(path)
    zoo = load_sr_model('srvgg_x4')
    assert (model.architecture, model.scale) == ('Compact', 4)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.module(x), zoo.module(x), atol=1e-6)
