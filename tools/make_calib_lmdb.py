"""Write a BasicSR-style LMDB (``data.mdb`` + ``meta_info.txt``) of calibration images from a folder.

Usage: ``python tools/make_calib_lmdb.py FOLDER OUT.lmdb``. Images are stored as their original encoded
bytes (PNG stays PNG), keyed by file stem, as BasicSR's LMDB readers expect.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
from tqdm import tqdm

SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def make_lmdb(folder: Path, out: Path) -> int:
    """Write every image of ``folder`` into the LMDB ``out`` (which must not exist); returns the count."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f'error: no image in {folder}')
    if Path(out).exists():
        raise SystemExit(f'error: {out} exists; remove it or choose another path (nothing is overwritten)')
    total = sum(p.stat().st_size for p in files)
    env = lmdb.open(str(out), map_size=max(total * 4, 1 << 24))
    lines = []
    with env.begin(write=True) as txn:
        for path in tqdm(files, desc='lmdb', unit='image'):
            data = path.read_bytes()
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if image is None:
                print(f'warning: skipping unreadable image {path}', file=sys.stderr)
                continue
            height, width = image.shape[:2]
            channels = 1 if image.ndim == 2 else image.shape[2]
            txn.put(path.stem.encode('ascii'), data)
            lines.append(f'{path.stem} ({height},{width},{channels}) 1')
    env.close()
    (Path(out) / 'meta_info.txt').write_text('\n'.join(lines) + '\n')
    return len(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', type=Path)
    parser.add_argument('out', type=Path)
    args = parser.parse_args(argv)
    count = make_lmdb(args.folder, args.out)
    print(f'wrote {count} images to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
