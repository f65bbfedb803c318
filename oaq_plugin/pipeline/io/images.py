"""Image files as the pipeline reads them: RGB float tensors (3, H, W) in [0, 1], the way BasicSR reads
them (BGR -> RGB). Grayscale images are repeated to three channels, 16-bit images rescaled, alpha dropped."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch

from ...errors import DataError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def decode_image(data: bytes, name: str, what: str = 'image') -> torch.Tensor:
    """RGB float tensor (3, H, W) in [0, 1] from encoded image bytes; raises DataError if unreadable.

    Args:
        data: The encoded file contents.
        name: The file's name, for the message.
        what: What the image is, for the message (e.g. ``'calibration image'``).
    """
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if array is None:
        raise DataError(f'cannot decode {what} {name}: not a readable image file')
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.shape[2] == 4:
        array = array[..., :3]
    elif array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    rgb = array[..., ::-1].astype(np.float32) / scale
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def read_image(path: Union[str, os.PathLike], what: str = 'image') -> torch.Tensor:
    """The image file at ``path`` as :func:`decode_image` returns it; DataError if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'{what} not found: {path}')
    return decode_image(path.read_bytes(), str(path), what)
