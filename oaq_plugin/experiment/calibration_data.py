"""Calibration images from the ``oaq.calib`` section: a folder of LR images or a BasicSR LMDB.

Images are read the way BasicSR reads them (BGR -> RGB, [0, 1]) and loaded on demand, so memory
does not grow with the number of images. Grayscale images are repeated to three channels, 16-bit
images rescaled, alpha dropped; unreadable images and images smaller than 8 pixels are skipped with
a warning naming the file; an empty or missing source is refused. A calibration folder holding images
of a test set is not refused, but the run warns, naming the set.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ..config import CalibConfig
from ..errors import ConfigError, DataError
from ..pipeline.io.images import IMAGE_SUFFIXES, decode_image
from ..pipeline.io.patches import PatchSource

MIN_SIDE = 8
logger = logging.getLogger('oaq_plugin')


def _folder_entries(root: Path) -> List[Tuple[str, Callable[[], bytes]]]:
    return [(str(p), (lambda p=p: p.read_bytes())) for p in image_files(root)]


def _lmdb_entries(root: Path) -> List[Tuple[str, Callable[[], bytes]]]:
    import lmdb
    meta = root / 'meta_info.txt'
    if not meta.is_file():
        raise DataError(f'LMDB {root} has no meta_info.txt; write it with tools/make_calib_lmdb.py')
    keys = []
    for number, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if not parts or len(parts) > 3:
            raise DataError(f'{meta}: line {number} is not "<key> [(h,w,c)] [compression]": {line!r}')
        keys.append(parts[0])
    if not keys:
        raise DataError(f'{meta} lists no image')
    try:
        env = lmdb.open(str(root), readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as error:
        raise DataError(f'cannot open LMDB {root}: {error}') from None

    def reader(key: str) -> Callable[[], bytes]:
        def read() -> bytes:
            with env.begin(write=False) as txn:
                value = txn.get(key.encode('ascii'))
            if value is None:
                raise DataError(f'LMDB {root}: key {key!r} from meta_info.txt is missing')
            return bytes(value)
        return read

    return [(f'{root}:{key}', reader(key)) for key in keys]


def calibration_entries(calib: CalibConfig) -> List[Tuple[str, Callable[[], bytes]]]:
    """``(name, read bytes)`` of every calibration image ``oaq.calib`` selects (its ``num_images`` drawn).

    Raises:
        ConfigError: No ``dataroot_lq``.
        DataError: The folder (or LMDB) is missing or holds no image.
    """
    if not calib.dataroot_lq:
        raise ConfigError('oaq.calib.dataroot_lq is missing: give a folder of LR calibration images '
                          '(or an LMDB with io_backend: lmdb); calibration never uses the test sets')
    root = Path(os.path.expanduser(calib.dataroot_lq))
    if not root.exists():
        raise DataError(f'calibration folder {root} does not exist (oaq.calib.dataroot_lq)')
    is_lmdb = calib.io_backend == 'lmdb' or root.suffix == '.lmdb' or (root / 'data.mdb').exists()
    entries = _lmdb_entries(root) if is_lmdb else _folder_entries(root)
    if not entries:
        raise DataError(f'calibration folder {root} holds no image ({", ".join(IMAGE_SUFFIXES)})')
    if calib.num_images is not None and calib.num_images < len(entries):
        entries = random.Random(calib.seed).sample(entries, calib.num_images)
        entries.sort(key=lambda entry: entry[0])
    return entries


def calibration_source(calib: CalibConfig) -> PatchSource:
    """The pool of calibration images described by ``oaq.calib`` (checked, lazily loaded)."""
    root = Path(os.path.expanduser(calib.dataroot_lq or ''))
    entries = calibration_entries(calib)
    names, loaders = [], []
    for name, read in entries:
        try:
            image = decode_image(read(), name, 'calibration image')
        except DataError as error:
            logger.warning('skipping calibration image: %s', error)
            continue
        if min(image.shape[-2:]) < MIN_SIDE:
            logger.warning('skipping calibration image %s: %dx%d is smaller than %d pixels', name,
                           image.shape[-1], image.shape[-2], MIN_SIDE)
            continue
        if min(image.shape[-2:]) < calib.patch_size:
            logger.warning('calibration image %s (%dx%d) is smaller than patch_size %d: patches are cut smaller',
                           name, image.shape[-1], image.shape[-2], calib.patch_size)
        names.append(name)
        loaders.append(lambda read=read, name=name: decode_image(read(), name, 'calibration image'))
    if not loaders:
        raise DataError(f'no usable calibration image in {root}: every file was unreadable or too small')
    return PatchSource(loaders, names)


PathLike = Union[str, os.PathLike]


def image_files(folder: PathLike) -> List[Path]:
    """The image files directly in ``folder`` (none when it is not a folder, e.g. an LMDB of a test set)."""
    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir() or root.suffix == '.lmdb':
        return []
    return sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def calibration_test_overlap(calib: CalibConfig, test_sets: Mapping[str, Iterable[PathLike]]) -> Dict[str, int]:
    """How many calibration images each test set holds: ``{test set: count}`` for the sets that hold any.

    Images are compared by content (a copied or renamed test image counts), so a calibration folder
    that is a test set's LR folder, or a copy of part of it, is found.

    Args:
        calib: The ``oaq.calib`` section.
        test_sets: ``{name: image files}`` of each test set (LR and, where there is one, HR images).
    """
    digests = {hashlib.sha256(read()).hexdigest() for _, read in calibration_entries(calib)}
    overlap = {}
    for name, files in test_sets.items():
        found = 0
        for path in files:
            try:
                found += hashlib.sha256(Path(path).read_bytes()).hexdigest() in digests
            except OSError:
                continue
        if found:
            overlap[name] = found
    return overlap


def warn_if_calibrating_on_test_sets(calib: CalibConfig, test_sets: Mapping[str, Iterable[PathLike]],
                                     log: Optional[logging.Logger] = None) -> Dict[str, int]:
    """Log a warning naming each test set that holds calibration images (their results would be optimistic).

    Returns what :func:`calibration_test_overlap` found.
    """
    overlap = calibration_test_overlap(calib, test_sets)
    for name, count in overlap.items():
        (log or logger).warning(f"OAQ: {count} of the calibration images in {calib.dataroot_lq} are images of the "
                                f"test set '{name}': its results will be optimistic; calibrate on other images")
    return overlap
