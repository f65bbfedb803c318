"""Packaging: the core installs with torch alone; each extra adds one way of running it."""
from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Everything that is an extra: blocked, the core must still quantize and run on the reference backend.
EXTRAS_ONLY = ('cv2', 'matplotlib', 'basicsr', 'mmengine', 'lmdb', 'triton', 'skimage', 'spandrel', 'safetensors',
               'onnx', 'onnxruntime', 'scipy', 'hypothesis')


def _requirement_names(text: str) -> set:
    names = set()
    for line in text.strip().splitlines():
        for stop in '<>=!~[ ':
            line = line.split(stop)[0]
        if line:
            names.add(line.strip().lower())
    return names


def test_the_core_requires_torch_alone_and_extras_add_the_rest():
    setup = configparser.ConfigParser()
    setup.read(ROOT / 'setup.cfg')
    assert _requirement_names(setup['options']['install_requires']) == {'torch', 'numpy', 'tqdm', 'pyyaml'}
    extras = {name: _requirement_names(text) for name, text in setup['options.extras_require'].items()}
    assert {'basicsr', 'mmengine', 'triton', 'onnx', 'test', 'all'} <= set(extras)
    assert 'basicsr' in extras['basicsr'] and 'mmengine' in extras['mmengine'] and 'triton' in extras['triton']
    assert set().union(*(v for k, v in extras.items() if k != 'all')) == extras['all']
    scripts = setup['options.entry_points']['console_scripts']
    assert 'oaq-test = oaq_plugin.cli.basicsr_test:main' in scripts


def test_quantize_runs_without_any_extra():
    code = (
        "import sys\n"
        f"for name in {EXTRAS_ONLY!r}:\n"
        "    sys.modules[name] = None  # importing it now fails, as when it is not installed\n"
        "import torch\n"
        "from oaq_plugin import OAQConfig, quantize, to_backend\n"
        "model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),\n"
        "                            torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.PixelShuffle(2))\n"
        "qmodel = quantize(model, [torch.rand(2, 3, 12, 12)], OAQConfig(search={'enabled': False}), progress=False)\n"
        "to_backend(qmodel, 'reference')\n"
        "assert qmodel(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)\n")
    completed = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                               env={'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin'})
    assert completed.returncode == 0, completed.stderr[-3000:]
