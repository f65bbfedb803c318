"""PNG figures people would rather look at: activation histograms with the two regions, crops of ground truth,
FP and quantized outputs with their PSNR and a map of the quantization error."""
from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ...quant.layers import quant_layers


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
        if bp is None or act.observer.num_batches == 0:
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
        # One filled step outline instead of ax.hist's 200 bar patches: the same picture, drawn ~50x faster.
        counts, edges = np.histogram(values, bins=200)
        ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color='0.3', baseline=0.5)
        ax.set_yscale('log')
        ax.set_ylim(bottom=0.5)
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


def crop_titles(values: Mapping[str, float], ground_truth: bool) -> List[str]:
    """Panel titles for ground truth / FP / quantized crops, with the image's PSNRs where measured.

    Args:
        values: The image's metrics as the reports store them per image (``fp_psnr``, ``quant_psnr``,
            ``fidelity_psnr``; any may be missing).
        ground_truth: Whether a ground-truth panel comes first.
    """
    def db(key: str) -> str:
        value = values.get(key)
        return f' {value:.2f} dB' if isinstance(value, (int, float)) else ''

    fidelity = db('fidelity_psnr')
    quantized = f'quantized{db("quant_psnr")}' + (f'\nvs FP{fidelity}' if fidelity else '')
    return (['ground truth'] if ground_truth else []) + [f'FP{db("fp_psnr")}', quantized]


def side_by_side_crop(images: List[np.ndarray], labels: List[str], path: Path, crop: int = 128,
                      difference: Optional[Tuple[int, int]] = None, difference_label: str = 'difference') -> None:
    """Save the same centre crop of several HWC BGR uint8 images side by side, labelled.

    Args:
        images: The images, all of one size.
        labels: One title per image (the callers put each image's PSNR in it).
        path: The PNG to write.
        crop: Side of the centre crop, in pixels.
        difference: ``(i, j)``: add a last panel mapping ``|images[i] - images[j]|`` (mean over channels),
            scaled to its own maximum, which the title gives in uint8 levels; a quantization error is a
            level or two, invisible side by side, so it needs its own map to be seen.
        difference_label: What the difference panel shows, e.g. ``'quantized - FP'``.
    """
    plt = _pyplot()
    h, w = images[0].shape[:2]
    size = min(crop, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    window = (slice(top, top + size), slice(left, left + size))
    panels = len(images) + (difference is not None)
    # Constrained layout keeps two-line titles inside the figure (tight_layout clipped them above square images).
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 3.0), squeeze=False, layout='constrained')
    for ax, image, label in zip(axes[0], images, labels):
        ax.imshow(image[window][..., ::-1], interpolation='nearest')
        ax.set_title(label, fontsize=9)
        ax.axis('off')
    if difference is not None:
        first, second = difference
        error = np.abs(images[first][window].astype(np.float32) - images[second][window].astype(np.float32))
        error = error.mean(axis=-1) if error.ndim == 3 else error
        peak = float(error.max())
        ax = axes[0, -1]
        ax.imshow(error, cmap='magma', vmin=0.0, vmax=max(peak, 1.0), interpolation='nearest')
        ax.set_title(f'|{difference_label}|\nmax {peak:.0f} of 255', fontsize=9)
        ax.axis('off')
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tensor_to_bgr_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) RGB in [0, 1] -> HWC BGR uint8, rounded as BasicSR's tensor2img does."""
    array = tensor.detach().float().clamp(0, 1)[0].cpu().numpy().transpose(1, 2, 0)[..., ::-1]
    return (array * 255.0).round().astype(np.uint8)
