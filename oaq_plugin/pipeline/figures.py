"""PNG figures people would rather look at: activation histograms with the two regions, FP-vs-quantized crops."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch
from torch import nn

from ..quant.layers import quant_layers


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def outlier_heavy_layers(qmodel: nn.Module, count: int) -> List[str]:
    """Names of the ``count`` layers whose calibration input reaches furthest beyond the dense region."""
    scored = []
    for name, layer in quant_layers(qmodel):
        act = layer.act_quantizer
        bp = getattr(act, 'breakpoint', None)
        if bp is None or act.observer is None or act.observer.num_batches == 0:
            continue
        reach = max(abs(float(act.lower.detach())), float(act.upper.detach())) / max(float(bp.detach()), 1e-12)
        scored.append((reach, name))
    return [name for _, name in sorted(scored, reverse=True)[:count]]


def activation_histograms(qmodel: nn.Module, path: Path, count: int = 4) -> List[str]:
    """Write a log-scale histogram of the calibration input of the most outlier-heavy layers.

    The dense region is shaded and the breakpoints and bounds are marked. Returns the layers drawn.
    """
    names = outlier_heavy_layers(qmodel, count)
    if not names:
        return []
    plt = _pyplot()
    layers = dict(quant_layers(qmodel))
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        act = layers[name].act_quantizer
        values = act.observer.sample().numpy()
        lower, upper, bp = (float(t.detach()) for t in (act.lower, act.upper, act.breakpoint))
        ax.hist(values, bins=200, color='0.3', log=True)
        ax.axvspan(-bp, bp, color='tab:blue', alpha=0.15, label='dense region')
        for x in (-bp, bp):
            ax.axvline(x, color='tab:blue', lw=1)
        for x in (lower, upper):
            ax.axvline(x, color='tab:red', lw=1, ls='--')
        ax.set_title(f'{name}: bounds [{lower:.3g}, {upper:.3g}], breakpoint {bp:.3g}', fontsize=9)
    axes[0, 0].legend(loc='upper right', fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return names


def side_by_side_crop(images: List[np.ndarray], labels: List[str], path: Path, crop: int = 128) -> None:
    """Save the same centre crop of several HWC BGR uint8 images side by side, labelled."""
    plt = _pyplot()
    h, w = images[0].shape[:2]
    size = min(crop, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 2.9), squeeze=False)
    for ax, image, label in zip(axes[0], images, labels):
        ax.imshow(image[top:top + size, left:left + size, ::-1], interpolation='nearest')
        ax.set_title(label, fontsize=9)
        ax.axis('off')
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tensor_to_bgr_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) RGB in [0, 1] -> HWC BGR uint8, rounded as BasicSR's tensor2img does."""
    array = tensor.detach().float().clamp(0, 1)[0].cpu().numpy().transpose(1, 2, 0)[..., ::-1]
    return (array * 255.0).round().astype(np.uint8)
