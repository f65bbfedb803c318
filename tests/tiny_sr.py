"""A tiny residual SR network and its calibrated quantized copy, shared by the search, finetuning and
sensitivity tests (seconds on a CPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from oaq_plugin import OAQConfig
from oaq_plugin.pipeline.stages.calibrate import calibrate
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.quant.convert import convert


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x))) + x


class TinyResSR(nn.Module):
    """head -> 2 residual blocks -> conv + PixelShuffle(2), plus the upsampled input: RGB [0, 1] in and out."""

    def __init__(self, channels=8):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.block1 = Block(channels)
        self.block2 = Block(channels)
        self.up = nn.Conv2d(channels, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        f = self.head(x)
        return self.shuffle(self.up(self.block2(self.block1(f)) + f)) + nn.functional.interpolate(x, scale_factor=2)


def tiny_images(count=6, size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Smooth images (upsampled noise) look more like photographs than white noise does.
    low = torch.rand(count, 3, size // 4, size // 4, generator=generator)
    return list(nn.functional.interpolate(low, size=(size, size), mode='bicubic', align_corners=False).clamp(0, 1))


def tiny_pipeline_world(options):
    """``(float model, calibration batches, config)`` for a whole pipeline run of the tiny network."""
    torch.manual_seed(0)
    model = TinyResSR().eval()
    batches = PatchSource(tiny_images()).batches(3, 4, 12, seed=1)
    return model, batches, OAQConfig.from_dict(options)


def calibrated_tiny(options=None, seed=0):
    """``(float model, quantized model, patch source, config, calibration batches)``, calibrated, not searched."""
    torch.manual_seed(seed)
    model = TinyResSR().eval()
    source = PatchSource(tiny_images(seed=seed))
    config = OAQConfig.from_dict(options or {})
    batches = source.batches(2, 4, 12, seed=1)
    qmodel = convert(model, config, batches[0][:1])
    calibrate(qmodel, batches, config)
    return model, qmodel, source, config, batches


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine spinning threads slow them a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def calibration_crops(shared, count=4, size=32, seed=0):
    """``count`` random LR crops of the SunHays80 x4 calibration images (never a test set)."""
    from oaq_plugin.pipeline.io.images import read_image
    files = sorted((shared / 'data/calib/SunHays80/LR_bicubic/X4').glob('*.png'))[:8]
    images = [read_image(f) for f in files]
    return PatchSource(images).batches(1, count, size, seed)[0]


def load_tool(name: str):
    """The script ``tools/<name>.py`` imported as a module (tools/ is not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'tools' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'oaq_tool_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
