"""Bad input and limits: unusable files are refused or handled with a message naming them; tiles match."""
from __future__ import annotations

import types

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from oaq_plugin import ConfigError, DataError, OAQConfig, OAQError, quantize
from oaq_plugin.experiment.calibration_data import calibration_source
from oaq_plugin.config import CalibConfig
from oaq_plugin.pipeline.io.images import read_image
from oaq_plugin.pipeline.inference import run_tiled


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / 'gray.png'), rng.integers(0, 256, (40, 40), dtype=np.uint8))
    cv2.imwrite(str(folder / 'deep.png'), rng.integers(0, 65536, (40, 40, 3), dtype=np.uint16))
    cv2.imwrite(str(folder / 'alpha.png'), rng.integers(0, 256, (40, 40, 4), dtype=np.uint8))
    cv2.imwrite(str(folder / 'tiny.png'), rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    (folder / 'broken.png').write_bytes(b'not an image at all')


def test_calibration_images_are_converted_or_skipped_with_a_named_warning(tmp_path, caplog):
    write_images(tmp_path / 'calib')
    with caplog.at_level('WARNING', logger='oaq_plugin'):
        source = calibration_source(CalibConfig(dataroot_lq=str(tmp_path / 'calib'), patch_size=16))
    assert sorted(name.rsplit('/', 1)[-1] for name in source.names) == ['alpha.png', 'deep.png', 'gray.png']
    messages = caplog.text
    assert 'broken.png' in messages and 'tiny.png' in messages
    for index in range(len(source)):
        image = source.image(index)
        assert image.shape[0] == 3 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    gray = source.image(source.names.index(next(n for n in source.names if n.endswith('gray.png'))))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@pytest.mark.parametrize('make,error,fragment', [
    (lambda p: None, ConfigError, 'dataroot_lq is missing'),
    (lambda p: str(p / 'absent'), DataError, 'does not exist'),
    (lambda p: (p / 'empty').mkdir() or str(p / 'empty'), DataError, 'holds no image'),
])
def test_missing_or_empty_calibration_source_is_refused(tmp_path, make, error, fragment):
    with pytest.raises(error, match=fragment):
        calibration_source(CalibConfig(dataroot_lq=make(tmp_path)))


def test_read_image_converts_and_names_bad_files(tmp_path):
    gray = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    cv2.imwrite(str(tmp_path / 'gray16.png'), gray)
    image = read_image(tmp_path / 'gray16.png')
    assert image.shape == (3, 3, 4) and torch.allclose(image[1], torch.from_numpy(gray / 65535.0).float())
    with pytest.raises(DataError, match='test image not found: .*missing.png'):
        read_image(tmp_path / 'missing.png', 'test image')
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    with pytest.raises(DataError, match='cannot decode image .*broken.png'):
        read_image(tmp_path / 'broken.png')


def test_lmdb_without_meta_info_is_refused(tmp_path):
    import lmdb
    env = lmdb.open(str(tmp_path / 'calib.lmdb'), map_size=1 << 20)
    env.close()
    with pytest.raises(DataError, match='meta_info.txt'):
        calibration_source(CalibConfig(dataroot_lq=str(tmp_path / 'calib.lmdb'), io_backend='lmdb'))


def fake_model_self():
    return types.SimpleNamespace(get_bare_model=lambda net: net)


@pytest.mark.parametrize('content,fragment', [
    (None, 'does not exist'),
    (b'garbage bytes', 'is not a checkpoint'),
])
def test_missing_or_corrupt_checkpoint(tmp_path, content, fragment):
    from oaq_plugin.basicsr_plugin.oaq_model import OAQModel
    path = tmp_path / 'net.pth'
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=fragment):
        OAQModel.load_network(fake_model_self(), nn.Conv2d(3, 3, 3), str(path))


def test_checkpoint_of_another_architecture_names_keys(tmp_path):
    from oaq_plugin.basicsr_plugin.oaq_model import OAQModel
    path = tmp_path / 'other.pth'
    torch.save({'params': nn.Sequential(nn.Conv2d(3, 3, 3)).state_dict()}, path)
    with pytest.raises(DataError, match=r"missing keys \(first: \['bias', 'weight'\]\).*unexpected keys"):
        OAQModel.load_network(fake_model_self(), nn.Conv2d(3, 3, 3), str(path))


def test_tiled_inference_equals_whole_image():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                        nn.PixelShuffle(2)).eval()
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        whole = net(x)
        tiled = run_tiled(net, x, scale=2, tile=16, pad=4)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.tail = nn.Conv2d(4, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        f = self.head(x)
        return self.shuffle(self.tail(f + torch.relu(self.body(f))))


KEYS = [f.name for f in __import__('dataclasses').fields(OAQConfig)] + ['w_bit', 'levles', 'calibration']
SECTION_KEYS = {'calib': ['num_batches', 'batch_size', 'patch_size', 'percentile', 'ema_beta', 'seed', 'bogus'],
                'search': ['enabled', 'grid_size', 'refine_rounds', 'num_samples', 'breakpoint', 'bogus'],
                'finetune': ['enabled', 'mode', 'epochs', 'iters_per_epoch', 'lr', 'temperature', 'bogus']}
VALUES = st.one_of(st.integers(-3, 12), st.floats(-10, 300), st.just(float("nan")), st.booleans(), st.none(),
                   st.sampled_from(['dual_region', 'minmax', 'mse', 'percentile', 'paper', 'pwlq', 'channel',
                                    'tensor', 'full', 'float_ends', 'fake', 'sensitivity', 'vanilla', 'x']),
                   st.lists(st.integers(2, 8), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@st.composite
def option_dicts(draw):
    options = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True)):
        if key in SECTION_KEYS:
            options[key] = draw(st.one_of(VALUES, st.dictionaries(st.sampled_from(SECTION_KEYS[key]), VALUES,
                                                                  max_size=3)))
        else:
            options[key] = draw(VALUES)
    return options


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=option_dicts())
def test_fuzzed_options_run_or_fail_clearly(options):
    try:
        config = OAQConfig.from_dict(options)
    except ConfigError:
        return
    # Bounded work per example: the fuzzing is about validation and robustness, not long runs.
    c, s, f = config.calib, config.search, config.finetune
    c.num_batches, c.batch_size, c.patch_size = min(c.num_batches, 2), min(c.batch_size, 2), min(c.patch_size, 16)
    s.grid_size, s.refine_rounds, s.num_samples = min(s.grid_size, 3), min(s.refine_rounds, 1), min(s.num_samples, 2)
    f.epochs, f.iters_per_epoch, f.batch_size, f.patch_size = min(f.epochs, 3), min(f.iters_per_epoch, 2), 1, 16
    f.tap_samples = min(f.tap_samples, 2)
    r = config.reconstruction
    r.iterations, r.num_samples, r.patch_size, r.batch_size = min(r.iterations, 3), min(r.num_samples, 2), 8, 1
    d = config.distillation
    d.iterations, d.batch_size, d.patch_size, d.check_crops = min(d.iterations, 3), 1, 8, 2
    torch.manual_seed(0)
    batches = [torch.rand(2, 3, 16, 16) for _ in range(2)]
    try:
        qmodel = quantize(Tiny().eval(), batches, config)
    except OAQError:
        return
    with torch.no_grad():
        assert torch.isfinite(qmodel(torch.rand(1, 3, 16, 16))).all()
