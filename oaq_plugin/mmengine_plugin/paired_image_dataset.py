"""``PairedImageDataset``: LR images, and optionally their HR ground truth, read from two folders.

Images are read the way BasicSR reads them (RGB, float in [0, 1]); without a ground-truth folder the
dataset lists LR images only, which is what calibration data is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from mmengine.dataset import BaseDataset
from mmengine.registry import DATASETS
from mmengine.structures import BaseDataElement

from ..pipeline.io.images import IMAGE_SUFFIXES, decode_image
from ..errors import DataError


@DATASETS.register_module()
class PairedImageDataset(BaseDataset):
    """Pairs ``gt/<name>.<ext>`` with ``lq/<filename_tmpl.format(name)>.<ext>`` (LR only without ``gt``).

    An item is ``dict(inputs=LR (C, h, w), data_samples=BaseDataElement(gt_img=HR (C, H, W)))`` with the
    image name and paths in the sample's metainfo; HR images are cropped to ``scale`` times the LR size,
    as benchmark HR images may be a few pixels larger than that.

    Args:
        data_root: Folder the prefixes are relative to.
        data_prefix: ``dict(lq=..., gt=...)`` folders of LR and HR images; ``gt`` may be left out.
        filename_tmpl: LR file stem for an HR stem, e.g. ``'{}x4'`` for ``baby.png`` -> ``babyx4.png``.
        scale: Upscaling factor of the pair.
        name: The dataset's name in reports and logs (``metainfo['dataset_name']``; default: the
            ``data_root`` folder's name).
        **kwargs: The rest of :class:`~mmengine.dataset.BaseDataset` (``indices``, ``pipeline``, ...).
    """

    def __init__(self, data_root: str = '', data_prefix: Optional[Dict[str, str]] = None, filename_tmpl: str = '{}',
                 scale: int = 1, name: Optional[str] = None, **kwargs: Any) -> None:
        data_prefix = dict(data_prefix or {})
        if 'lq' not in data_prefix:
            raise DataError("PairedImageDataset: data_prefix needs 'lq', the folder of LR images")
        self.filename_tmpl = filename_tmpl
        self.scale = int(scale)
        self.name = name
        super().__init__(data_root=data_root, data_prefix=data_prefix, **kwargs)

    @property
    def metainfo(self) -> dict:
        # Not passed through BaseDataset's metainfo, which takes every string value for a file to parse.
        return dict(super().metainfo, dataset_name=self.name or Path(self.data_root or self.data_prefix['lq']).name)

    @staticmethod
    def _images(folder: str, role: str) -> Dict[str, Path]:
        root = Path(folder)
        if not root.is_dir():
            raise DataError(f'{role} image folder {root} does not exist')
        files = {p.stem: p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
        if not files:
            raise DataError(f'{role} image folder {root} holds no image ({", ".join(IMAGE_SUFFIXES)})')
        return files

    def load_data_list(self) -> List[dict]:
        lq_files = self._images(self.data_prefix['lq'], 'LR')
        if not self.data_prefix.get('gt'):
            return [dict(img_name=stem, lq_path=str(path), gt_path=None) for stem, path in lq_files.items()]
        data_list = []
        for stem, gt_path in self._images(self.data_prefix['gt'], 'HR').items():
            lq_stem = self.filename_tmpl.format(stem)
            if lq_stem not in lq_files:
                raise DataError(f"no LR image '{lq_stem}.*' in {self.data_prefix['lq']} for HR image {gt_path} "
                                f"(filename_tmpl '{self.filename_tmpl}')")
            data_list.append(dict(img_name=stem, lq_path=str(lq_files[lq_stem]), gt_path=str(gt_path)))
        return data_list

    def prepare_data(self, idx: int) -> Any:
        info = self.get_data_info(idx)
        lq = decode_image(Path(info['lq_path']).read_bytes(), info['lq_path'])
        sample = BaseDataElement(metainfo=dict(img_name=info['img_name'], lq_path=info['lq_path'],
                                               gt_path=info['gt_path'], scale=self.scale))
        if info['gt_path'] is not None:
            gt = decode_image(Path(info['gt_path']).read_bytes(), info['gt_path'])
            height, width = lq.shape[-2] * self.scale, lq.shape[-1] * self.scale
            if gt.shape[-2] < height or gt.shape[-1] < width:
                raise DataError(f"HR image {info['gt_path']} ({gt.shape[-1]}x{gt.shape[-2]}) is smaller than "
                                f"{self.scale}x its LR image {os.path.basename(info['lq_path'])} "
                                f"({lq.shape[-1]}x{lq.shape[-2]}); check scale and the folders")
            sample.gt_img = gt[:, :height, :width]
        return self.pipeline(dict(inputs=lq, data_samples=sample))
