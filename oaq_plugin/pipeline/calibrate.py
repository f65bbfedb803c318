"""Calibration: one float forward pass over the calibration batches initializes every quantizer."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..config import OAQConfig
from ..errors import DataError
from ..quant.convert import set_mode
from ..quant.layers import quant_layers


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device('cpu')


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable[torch.Tensor], config: OAQConfig,
              indices: Optional[Sequence[int]] = None, progress: bool = False) -> int:
    """Observe every quantized layer's input on ``batches`` and initialize the quantizers.

    Under ``torch.distributed`` each process passes its share of the batches with their global
    ``indices``; the per-batch statistics are gathered so every process ends with the parameters a
    single process would compute from all batches.

    Returns:
        The number of batches this process observed.
    """
    layers = quant_layers(qmodel)
    set_mode(qmodel, 'observe')
    device = model_device(qmodel)
    count = 0
    try:
        for position, batch in enumerate(tqdm(batches, desc='calibrate', unit='batch', disable=not progress,
                                              leave=False)):
            index = indices[position] if indices is not None else position
            for _, layer in layers:
                layer.batch_index = index
            qmodel(batch.to(device))
            count += 1
    finally:
        set_mode(qmodel, 'quant')
    _merge_across_processes(layers)
    if not any(layer.act_quantizer.observer.num_batches for _, layer in layers):
        raise DataError('calibration saw no batch: the calibration data is empty')
    for name, layer in layers:
        if layer.act_quantizer.observer.num_batches == 0:
            raise DataError(f"layer '{name}' saw no calibration input; it does not run on these inputs")
        layer.act_quantizer.initialize(config.calib.ema_beta)
    return count


def _merge_across_processes(layers) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    local = {name: layer.act_quantizer.observer.state_dict() for name, layer in layers}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    for name, layer in layers:
        layer.act_quantizer.observer.merge(states[name] for states in gathered)
