"""The demo's images: scikit-image's bundled samples, split once into training and held-out sets.

The split lives here so that ``tools/train_demo_model.py`` and the demo cannot disagree on it: the
network is trained, and the demo calibrated, only on ``TRAIN_IMAGES``; the demo validates only on
``HELD_OUT_IMAGES``. Only samples that ship inside the scikit-image wheel are used (no download).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

SCALE = 2

# ``skimage.data.cat`` is ``chelsea`` under another name and the two views of ``stereo_motorcycle``
# show one scene: ``cat`` and the right view are never used, so no held-out content reaches training.
HELD_OUT_IMAGES: Tuple[str, ...] = ('astronaut', 'chelsea', 'coffee')
TRAIN_IMAGES: Tuple[str, ...] = (
    'rocket', 'motorcycle', 'immunohistochemistry', 'hubble_deep_field', 'retina',
    'camera', 'moon', 'coins', 'grass', 'gravel', 'brick', 'clock', 'page', 'text', 'cell',
)
# Calibration only needs a few LR images whose statistics resemble natural photographs.
CALIBRATION_IMAGES: Tuple[str, ...] = ('rocket', 'motorcycle', 'immunohistochemistry', 'camera')


def _loader(name: str) -> Callable[[], np.ndarray]:
    from skimage import data

    if name == 'motorcycle':
        return lambda: data.stereo_motorcycle()[0]
    return getattr(data, name)


def load_rgb(name: str) -> np.ndarray:
    """A sample as an RGB uint8 array (H, W, 3); grayscale samples are repeated to three channels."""
    if name not in HELD_OUT_IMAGES + TRAIN_IMAGES:
        raise KeyError(f'{name!r} is not a demo image; known: {", ".join(HELD_OUT_IMAGES + TRAIN_IMAGES)}')
    image = np.asarray(_loader(name)())
    if image.dtype != np.uint8:
        raise TypeError(f'skimage.data.{name} is {image.dtype}, the demo expects uint8 samples')
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def mod_crop(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Crop (H, W, C) so that both sides are multiples of ``scale``, as BasicSR's test sets are."""
    height, width = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
    return image[:height, :width]


def bicubic_resize(image: np.ndarray, factor: float) -> np.ndarray:
    """MATLAB-style bicubic resize (BasicSR's ``imresize``) of a uint8 (H, W, 3) image, rounded to uint8."""
    from ..compat import install_basicsr_compat

    install_basicsr_compat()
    from basicsr.utils.matlab_functions import imresize

    resized = imresize(image.astype(np.float32) / 255.0, factor)
    return np.clip(np.round(resized * 255.0), 0, 255).astype(np.uint8)


def hr_lr_pair(name: str, scale: int = SCALE) -> Tuple[np.ndarray, np.ndarray]:
    """``(hr, lr)`` RGB uint8 arrays: the mod-cropped sample and its bicubic downscale."""
    hr = mod_crop(load_rgb(name), scale)
    return hr, bicubic_resize(hr, 1.0 / scale)


def hr_lr_pairs(names: Tuple[str, ...], scale: int = SCALE) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    return {name: hr_lr_pair(name, scale) for name in names}

