"""The demo's data folder: a BasicSR paired test set, LR calibration images and a copy of the weights.

Everything the demo's option files name lies under one folder (``results/oaq_demo_data`` of the
current directory), so those files hold only relative paths and work as written once the folder
exists. The folder is rewritten when its manifest does not match what this installation would write.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, Sequence

import cv2
import numpy as np

from . import network, sample_images

DATA_ROOT = Path('results') / 'oaq_demo_data'
TEST_HR = Path('test') / 'HR'
TEST_LR = Path('test') / f'LR_bicubic_x{sample_images.SCALE}'
CALIB_LR = Path('calib') / f'LR_bicubic_x{sample_images.SCALE}'
WEIGHTS_NAME = network.WEIGHTS_PATH.name
MANIFEST = 'manifest.json'


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # OpenCV writes BGR; BasicSR reads the file back with OpenCV and converts to RGB.
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f'cannot write {path}')


def _manifest(test_images: Sequence[str], calib_images: Sequence[str]) -> Dict[str, object]:
    import skimage

    return {
        'scale': sample_images.SCALE,
        'test_images': list(test_images),
        'calib_images': list(calib_images),
        'weights_sha256': _digest(network.WEIGHTS_PATH),
        'scikit_image': skimage.__version__,
    }


def write_demo_data(root: Path = DATA_ROOT, test_images: Sequence[str] = sample_images.HELD_OUT_IMAGES,
                    calib_images: Sequence[str] = sample_images.CALIBRATION_IMAGES) -> bool:
    """Write (or reuse) the demo's data folder; returns whether anything was written.

    Args:
        root: The folder (relative paths are taken from the current directory, as BasicSR does).
        test_images: Held-out samples for the paired test set (HR mod-cropped, LR bicubic).
        calib_images: Training samples whose LR images calibrate the quantizers.
    """
    leaked = sorted(set(test_images) & set(sample_images.TRAIN_IMAGES))
    if leaked or not set(calib_images) <= set(sample_images.TRAIN_IMAGES):
        raise ValueError(f'test images must be held out and calibration images must be training images '
                         f'(test: {list(test_images)}, calibration: {list(calib_images)})')
    root = Path(root)
    if not network.WEIGHTS_PATH.is_file():
        raise FileNotFoundError(f'the demo weights {network.WEIGHTS_PATH} are missing; '
                                f'run tools/train_demo_model.py to recreate them')
    manifest = _manifest(test_images, calib_images)
    manifest_path = root / MANIFEST
    expected = ([root / folder / f'{name}.png' for name in test_images for folder in (TEST_HR, TEST_LR)]
                + [root / CALIB_LR / f'{name}.png' for name in calib_images] + [root / WEIGHTS_NAME])
    if (manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest
            and all(path.is_file() for path in expected)):
        return False
    for folder in (root / TEST_HR, root / TEST_LR, root / CALIB_LR):
        # Stale images from another selection would silently join the test or calibration set.
        if folder.exists():
            shutil.rmtree(folder)
    for name in test_images:
        hr, lr = sample_images.hr_lr_pair(name)
        _write_png(root / TEST_HR / f'{name}.png', hr)
        _write_png(root / TEST_LR / f'{name}.png', lr)
    for name in calib_images:
        _, lr = sample_images.hr_lr_pair(name)
        _write_png(root / CALIB_LR / f'{name}.png', lr)
    shutil.copyfile(network.WEIGHTS_PATH, root / WEIGHTS_NAME)
    manifest_path.write_text(json.dumps(manifest, indent=2) + '\n')
    return True
