"""``SRDataPreprocessor``: turns a collated batch into an (N, C, H, W) LR tensor on the model's device."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from mmengine.model import BaseDataPreprocessor
from mmengine.registry import MODELS

from ..errors import DataError


@MODELS.register_module()
class SRDataPreprocessor(BaseDataPreprocessor):
    """Moves a batch to the device and stacks its LR images; values are left as read ([0, 1] RGB).

    A batch is ``dict(inputs=[(C, H, W), ...], data_samples=[...])`` (``pseudo_collate``) or one whose
    ``inputs`` is already stacked (``default_collate``); images of one batch must share a size.
    """

    def forward(self, data: Any, training: bool = False) -> dict:
        if not isinstance(data, Mapping) or 'inputs' not in data:
            raise DataError(f"SRDataPreprocessor: expected a batch dict with 'inputs', got {type(data).__name__}")
        data = self.cast_data(dict(data))
        inputs = data['inputs']
        if isinstance(inputs, (list, tuple)):
            shapes = {tuple(image.shape) for image in inputs}
            if len(shapes) != 1:
                raise DataError(f'SRDataPreprocessor: one batch holds images of sizes {sorted(shapes)}; use '
                                'batch_size=1 for datasets of images of different sizes')
            inputs = torch.stack(list(inputs))
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise DataError(f'SRDataPreprocessor: inputs must form an (N, C, H, W) batch, got {shape}')
        return dict(inputs=inputs.float(), data_samples=data.get('data_samples'))
