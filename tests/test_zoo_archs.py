"""Model zoo architectures: shapes and invariants on random weights, strict loading of the real checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from oaq_plugin.archs import CARNM, FSRCNN, IMDN, PAN, RFDN, ZOO, ZOO_ARCHS, FSRCNNLuma, build_zoo_model
from oaq_plugin.archs.zoo import get_zoo_entry, load_zoo_state_dict

# (class, constructor kwargs, state-dict tensor count, state-dict element count) of each released layout,
# the counts as listed for the checkpoint in shared/weights/STATE_DICT_KEYS.txt.
CHECKPOINT_LAYOUTS = {
    'imdn_x2': (IMDN, {'upscale': 2}, 92, 694404),
    'imdn_x3': (IMDN, {'upscale': 3}, 92, 703059),
    'imdn_x4': (IMDN, {'upscale': 4}, 92, 715176),
    'pan_x2': (PAN, {'upscale': 2}, 140, 261403),
    'pan_x3': (PAN, {'upscale': 3}, 140, 261403),
    'pan_x4': (PAN, {'upscale': 4}, 146, 272419),
    'rfdn_x4': (RFDN, {'upscale': 4}, 128, 433448),
    'carn_m': (CARNM, {'upscale': 4}, 58, 414811),
    'fsrcnn': (FSRCNN, {'upscale': 2}, 23, 12809),
}

# Smallest side RFDN's attention branch accepts is 15; 16x18 keeps height and width distinguishable.
LR_SHAPE = (2, 3, 16, 18)


def _random_input(shape=LR_SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('layout', sorted(CHECKPOINT_LAYOUTS))
def test_default_construction_matches_checkpoint_layout(layout):
    arch, kwargs, num_tensors, num_elements = CHECKPOINT_LAYOUTS[layout]
    state = arch(**kwargs).state_dict()
    assert len(state) == num_tensors
    assert sum(t.numel() for t in state.values()) == num_elements


@pytest.mark.parametrize('arch, scale', [(IMDN, 2), (IMDN, 3), (IMDN, 4), (PAN, 2), (PAN, 3), (PAN, 4), (RFDN, 2),
                                         (RFDN, 4), (CARNM, 2), (CARNM, 3), (CARNM, 4), (FSRCNN, 2), (FSRCNN, 3),
                                         (FSRCNN, 4)])
def test_random_init_output_shape(arch, scale):
    torch.manual_seed(0)
    model = arch(upscale=scale).eval()
    with torch.inference_mode():
        out = model(_random_input())
    n, c, h, w = LR_SHAPE
    assert out.shape == (n, c, h * scale, w * scale)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('arch', [IMDN, PAN, RFDN, CARNM, FSRCNN])
def test_every_parameter_sits_in_a_layer_a_quantizer_can_wrap(arch):
    # Quantization wraps layers by module type: a weight held anywhere else would silently stay in float.
    allowed = (nn.Conv2d, nn.ConvTranspose2d, nn.PReLU)
    for name, module in arch().named_modules():
        if list(module.parameters(recurse=False)):
            assert isinstance(module, allowed), f'{arch.__name__}.{name} holds parameters'


def test_zoo_archs_names_are_the_class_names():
    assert {name: cls.__name__ for name, cls in ZOO_ARCHS.items()} == {name: name for name in ZOO_ARCHS}


def test_carn_m_upscale_switch_uses_shared_body_and_keeps_all_upsamplers():
    torch.manual_seed(0)
    model = CARNM(upscale=4).eval()
    assert {key.split('.')[1] for key in model.state_dict() if key.startswith('upsample.')} == {'up2', 'up3', 'up4'}
    same_weights_x2 = CARNM(upscale=2).eval()
    same_weights_x2.load_state_dict(model.state_dict(), strict=True)
    x = _random_input()
    with torch.inference_mode():
        model.upscale = 2
        out_x2 = model(x)
        model.upscale = 3
        out_x3 = model(x)
        expected_x2 = same_weights_x2(x)
    assert out_x2.shape[-2:] == (32, 36)
    assert out_x3.shape[-2:] == (48, 54)
    torch.testing.assert_close(out_x2, expected_x2, rtol=0, atol=0)


def test_carn_m_rejects_unsupported_scale():
    with pytest.raises(ValueError, match='upscale'):
        CARNM(upscale=8)
    model = CARNM()
    with pytest.raises(ValueError, match='upscale'):
        model.upscale = 5


def _bt601_luma(rgb: torch.Tensor) -> torch.Tensor:
    """Y of BasicSR's rgb2ycbcr on [0, 1] RGB, written from its coefficients so as not to share code with FSRCNN."""
    weights = torch.tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return ((rgb * weights).sum(dim=1, keepdim=True) + 16.) / 255.


def _bt601_chroma(rgb: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([[-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]).view(2, 3, 1, 1)
    return (torch.nn.functional.conv2d(rgb, weights) + 128.) / 255.


def test_fsrcnn_keeps_a_gray_image_gray():
    torch.manual_seed(0)
    model = FSRCNN(upscale=3).eval()
    gray = _random_input((1, 1, 16, 18)).expand(1, 3, 16, 18)
    with torch.inference_mode():
        out = model(gray)
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 0], out[:, 2], rtol=0, atol=1e-5)


def test_fsrcnn_luma_is_the_network_output_and_chroma_is_carried_over():
    torch.manual_seed(0)
    model = FSRCNN(upscale=2).eval()
    luma_net = FSRCNNLuma(upscale=2).eval()
    luma_net.load_state_dict(model.state_dict(), strict=True)
    x = _random_input()
    with torch.inference_mode():
        out = model(x)
        expected_luma = luma_net(_bt601_luma(x))
    torch.testing.assert_close(_bt601_luma(out), expected_luma, rtol=0, atol=1e-5)
    # A constant colour has constant chroma, and bicubic upsampling must hand it back unchanged.
    colour = torch.tensor([0.8, 0.3, 0.1]).view(1, 3, 1, 1).expand(1, 3, 16, 18)
    with torch.inference_mode():
        chroma = _bt601_chroma(model(colour))
    torch.testing.assert_close(chroma, _bt601_chroma(colour[..., :1, :1]).expand_as(chroma), rtol=0, atol=1e-5)


def test_fsrcnn_state_dict_is_the_luma_checkpoint_layout():
    assert FSRCNN().state_dict().keys() == FSRCNNLuma().state_dict().keys()


def test_fsrcnn_rejects_non_rgb_input():
    with pytest.raises(ValueError, match='FSRCNNLuma'):
        FSRCNN()(torch.rand(1, 1, 8, 8))


def test_rfdn_takes_unit_range_and_scales_internally():
    torch.manual_seed(0)
    model = RFDN(img_range=255.).eval()
    raw = RFDN(img_range=1.).eval()
    raw.load_state_dict(model.state_dict(), strict=True)
    x = _random_input()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), raw(x * 255.) / 255., rtol=1e-5, atol=1e-5)


def test_zoo_table_is_consistent():
    assert sorted(ZOO) == sorted([
        'imdn_x2', 'imdn_x3', 'imdn_x4', 'pan_x2', 'pan_x3', 'pan_x4', 'rfdn_x4', 'carn_m_x2', 'carn_m_x3',
        'carn_m_x4', 'fsrcnn_x2', 'fsrcnn_x3', 'fsrcnn_x4', 'srvgg_x4'
    ])
    for key, entry in ZOO.items():
        assert entry.key == key
        assert entry.arch_type in ZOO_ARCHS or entry.arch_type == 'SRVGGNetCompact'
        assert entry.kwargs['upscale'] == entry.scale
        assert entry.weight_path.startswith('weights/') and entry.weight_path.endswith('.pth')
        assert entry.network_options()['type'] == entry.arch_type
    # Entries travel through option handling and worker processes: they must copy and hash.
    entry = ZOO['srvgg_x4']
    assert copy.deepcopy(entry) == entry and hash(copy.deepcopy(entry)) == hash(entry)


def test_unknown_zoo_key_names_the_closest_one():
    with pytest.raises(KeyError, match="did you mean 'carn_m_x2'"):
        get_zoo_entry('carn_x2')


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match='OAQ_SHARED') as error:
        build_zoo_model('imdn_x2', shared_root=tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize('key', sorted(ZOO))
def test_checkpoint_loads_strictly_and_runs(shared, key):
    entry = ZOO[key]
    model = build_zoo_model(key, shared_root=shared)
    assert not model.training
    state = load_zoo_state_dict(entry, shared)
    assert not any(name.startswith('module.') for name in state)
    # Same order too, so passes that pick layers by registration order agree with the original code.
    assert list(state) == list(model.state_dict())
    with torch.inference_mode():
        out = model(_random_input())
    n, c, h, w = LR_SHAPE
    assert out.shape == (n, c, h * entry.scale, w * entry.scale)
    assert torch.isfinite(out).all()
