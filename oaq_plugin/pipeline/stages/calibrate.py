"""Calibration: one float forward pass over the calibration batches initializes every quantizer."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ...config import OAQConfig
from ...errors import DataError
from ...quant.attention import matmul_quantizers, quant_matmuls
from ...quant.convert import set_mode
from ...quant.layers import quant_layers
from .base import Stage, StageContext


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device('cpu')


class CalibrateStage(Stage):
    """Calibration, always the first stage; resumable after any batch.

    Under ``context.calib_shard`` (``torch.distributed``) this process observes the batches ``rank,
    rank + world_size, ...`` and the statistics are merged across processes. Its safe point follows each
    batch with ``{'batches_done': n}`` (this process's batches observed so far); a resumed calibration has
    the observers' records of those back and observes the rest.
    """

    name = 'calibrate'

    def enabled(self, config: OAQConfig) -> bool:
        return True

    def run(self, context: StageContext) -> None:
        rank, world = context.calib_shard or (0, 1)
        done = context.saved['batches_done'] if context.saved is not None else 0
        mine = list(range(rank, len(context.batches), world))[done:]
        _calibrate(context.qmodel, [context.batches[i] for i in mine], context.config, mine, context.progress,
                   lambda count: context.safe_point(lambda: {'batches_done': done + count}))


def calibrate(qmodel: nn.Module, batches: Iterable[torch.Tensor], config: OAQConfig,
              indices: Optional[Sequence[int]] = None, progress: bool = False) -> int:
    """Observe every quantized layer's input on ``batches`` and initialize the quantizers.

    The operands of quantized attention matmuls are observed and initialized in the same pass.

    Under ``torch.distributed`` each process passes its share of the batches with their global
    ``indices``; the per-batch statistics are gathered so every process ends with the parameters a
    single process would compute from all batches.

    Returns:
        The number of batches this process observed.
    """
    return _calibrate(qmodel, batches, config, indices, progress, lambda count: None)


@torch.no_grad()
def _calibrate(qmodel: nn.Module, batches: Iterable[torch.Tensor], config: OAQConfig,
               indices: Optional[Sequence[int]], progress: bool, after_batch: Callable[[int], None]) -> int:
    """:func:`calibrate`, calling ``after_batch(batches observed so far)`` after each batch."""
    layers = quant_layers(qmodel)
    matmuls = quant_matmuls(qmodel)
    set_mode(qmodel, 'observe')
    device = model_device(qmodel)
    count = 0
    try:
        for position, batch in enumerate(tqdm(batches, desc='calibrate', unit='batch', disable=not progress,
                                              leave=False)):
            index = indices[position] if indices is not None else position
            for _, layer in layers + matmuls:
                layer.batch_index = index
            qmodel(batch.to(device))
            count += 1
            after_batch(count)
    finally:
        set_mode(qmodel, 'quant')
    quantizers = [(f"layer '{name}'", layer.act_quantizer) for name, layer in layers]
    quantizers += [(f"matmul operand '{name}'", quantizer) for name, _, quantizer in matmul_quantizers(qmodel)]
    _merge_across_processes(quantizers)
    if not any(quantizer.observer.num_batches for _, quantizer in quantizers):
        raise DataError('calibration saw no batch: the calibration data is empty')
    for what, quantizer in quantizers:
        if quantizer.observer.num_batches == 0:
            raise DataError(f'{what} saw no calibration input; it does not run on these inputs')
        quantizer.initialize(config.calib.ema_beta)
    return count


def _merge_across_processes(quantizers) -> None:
    """Merge the observers of ``(name, quantizer)`` pairs across processes, in place."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    local = {name: quantizer.observer.state_dict() for name, quantizer in quantizers}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    for name, quantizer in quantizers:
        quantizer.observer.merge(states[name] for states in gathered)
