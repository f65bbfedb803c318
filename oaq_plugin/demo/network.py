"""The demo network: a small BasicSR ``EDSR`` (x2) and its committed weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from torch import nn

WEIGHTS_PATH = Path(__file__).resolve().parent / 'demo_edsr_x2.pth'

# Exactly the ``network_g`` of the demo's option files (tests/test_demo.py checks they agree).
NETWORK_G: Dict[str, Any] = {
    'type': 'EDSR',
    'num_in_ch': 3,
    'num_out_ch': 3,
    'num_feat': 32,
    'num_block': 4,
    'upscale': 2,
    'res_scale': 1,
    'img_range': 255.0,
    'rgb_mean': [0.4488, 0.4371, 0.4040],
}


def build_network() -> nn.Module:
    """The float EDSR of ``NETWORK_G``, randomly initialized, through BasicSR's arch registry."""
    from ..basicsr_plugin.registration import build_arch

    return build_arch(NETWORK_G)


def load_network(path: Path = WEIGHTS_PATH) -> nn.Module:
    """The demo EDSR with the weights at ``path`` (BasicSR format: ``{'params': state_dict}``), strictly."""
    import torch

    network = build_network()
    state = torch.load(path, map_location='cpu', weights_only=True)
    network.load_state_dict(state['params'], strict=True)
    return network.eval()
