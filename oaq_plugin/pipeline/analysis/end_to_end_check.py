"""A cheap end-to-end check after quantization: fidelity of the quantized output on a few held-back
calibration crops, and which blocks lose the most, so a collapsed network is flagged when it is made."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ...config import OAQConfig
from ...quant.convert import modes_restored, quantized_modules
from ..io.patches import PatchSource
from ..metrics.image_quality import psnr_from_mse, y_mse

logger = logging.getLogger('oaq_plugin')

CHECK_CROPS = 4
CHECK_CROP_SIZE = 64
# Added to the calibration seed: the check's crops are drawn apart from the calibration batches.
HELD_BACK_SEED = 104729
# Fidelity (PSNR-Y of the quantized output against the float output) below which the run warns. On the
# zoo's x4 checkpoints (docs/BENCHMARKS.md, "End-to-end check") every W4A4 run that loses 5 dB or more of
# Set5 PSNR checks at 25.97 dB or less (IMDN, RFDN, SRVGG with MinMax; FSRCNN), every W4A4 run that loses
# 4.5 dB or less at 26.50 dB or more, and W8A8 at 42.8-52.1 dB.
WARN_BELOW_DB = 26.0


@dataclass
class BlockLoss:
    """One block quantized alone (the rest in float): the fidelity it leaves, and its share of the errors.

    Args:
        name: The block's module name (usable as a ``layer_bits``/``exclude`` pattern prefix).
        layers: Quantized layers and matmuls inside it.
        fidelity_psnr: PSNR-Y against the float output with only this block quantized.
        error_share: Its squared error over the sum of all blocks' (alone) squared errors.
    """

    name: str
    layers: int
    fidelity_psnr: Optional[float]
    error_share: float

    def to_dict(self) -> dict:
        return {'name': self.name, 'layers': self.layers, 'fidelity_psnr': self.fidelity_psnr,
                'error_share': self.error_share}


@dataclass
class EndToEndCheck:
    """What :func:`end_to_end_check` measured.

    Args:
        fidelity_psnr: PSNR-Y (uint8, border = scale) of the quantized output against the float network's,
            from the mean squared error over the crops (``None``: identical outputs).
        threshold_db: The fidelity below which the check warns.
        warning: The warning given, or ``None``.
        crops: Number of held-back crops; ``crop_size`` their side in input pixels.
        blocks: Per block (execution order of the module tree), its loss alone; see :meth:`worst`.
        seconds: Time the check took.
    """

    fidelity_psnr: Optional[float]
    threshold_db: float
    warning: Optional[str]
    crops: int
    crop_size: int
    blocks: List[BlockLoss] = field(default_factory=list)
    seconds: float = 0.0

    def worst(self, count: int = 3) -> List[BlockLoss]:
        """The blocks that lose the most alone, worst first."""
        return sorted(self.blocks, key=lambda b: -b.error_share)[:count]

    def summary(self) -> str:
        """One line: the fidelity and the blocks losing the most."""
        fidelity = 'identical to float' if self.fidelity_psnr is None else f'fidelity {self.fidelity_psnr:.2f} dB'
        worst = ', '.join(f'{b.name} {100 * b.error_share:.0f}%' for b in self.worst() if b.error_share > 0)
        where = f'; largest shares of the error (block alone): {worst}' if worst else ''
        return f'OAQ check: {fidelity} on {self.crops} held-back calibration crops ({self.crop_size} px){where}'

    def to_dict(self) -> dict:
        return {'fidelity_psnr': self.fidelity_psnr, 'threshold_db': self.threshold_db, 'warning': self.warning,
                'crops': self.crops, 'crop_size': self.crop_size, 'seconds': round(self.seconds, 3),
                'blocks': [b.to_dict() for b in self.blocks], 'worst': [b.name for b in self.worst()]}


def held_back_crops(source: PatchSource, config: OAQConfig, count: int = CHECK_CROPS,
                    size: int = CHECK_CROP_SIZE) -> torch.Tensor:
    """``count`` crops of the calibration pool drawn with their own seed (not the calibration batches')."""
    generator = torch.Generator().manual_seed(config.calib.seed + HELD_BACK_SEED)
    return source.batch(count, min(size, config.calib.patch_size), generator)


def _mean_error(model: nn.Module, crops: torch.Tensor, references: Sequence[torch.Tensor], border: int) -> float:
    with torch.no_grad():
        outputs = model(crops)
    return sum(y_mse(out.cpu(), ref, border) for out, ref in zip(outputs, references)) / len(references)


def _psnr(mse: float) -> Optional[float]:
    value = psnr_from_mse(mse)
    return value if math.isfinite(value) else None


def end_to_end_check(float_model: nn.Module, qmodel: nn.Module, source: PatchSource, config: OAQConfig,
                     threshold_db: float = WARN_BELOW_DB, log: bool = True) -> EndToEndCheck:
    """Compare the quantized and the float network on a few held-back calibration crops.

    Measures the fidelity PSNR of the whole quantized network, then, block by block (the blocks of block
    reconstruction: modules of at most ``reconstruction.max_layers`` quantized layers), the fidelity with
    only that block quantized, and logs one line (a warning when the fidelity is below ``threshold_db``).

    Args:
        float_model: The float network (the reference; not modified).
        qmodel: The quantized network, as it will run (its layer modes are restored afterwards).
        source: The calibration pool the crops are cut from.
        config: The method's configuration (calibration seed and patch size, block size).
        threshold_db: Fidelity below which the check warns.
        log: Log the line.
    """
    from ..stages.block_reconstruction import reconstruction_blocks
    start = time.perf_counter()
    device = next(qmodel.parameters()).device
    crops = held_back_crops(source, config).to(device)
    was_training = (float_model.training, qmodel.training)
    float_model.eval()
    qmodel.eval()
    try:
        with torch.no_grad():
            references = [out.cpu().clamp(0, 1) for out in float_model(crops)]
        scale = max(1, references[0].shape[-1] // crops.shape[-1])
        border = scale if scale > 1 else 0
        total = _mean_error(qmodel, crops, references, border)
        modules = quantized_modules(qmodel)
        blocks: List[BlockLoss] = []
        errors: Dict[str, float] = {}
        with modes_restored(qmodel):
            modes = {name: module.mode for name, module in modules}
            for block in reconstruction_blocks(qmodel, config.reconstruction.max_layers):
                inside = [name for name, _ in modules if name == block or name.startswith(block + '.')]
                for name, module in modules:
                    module.set_mode(modes[name] if name in inside else 'float')
                errors[block] = _mean_error(qmodel, crops, references, border)
                blocks.append(BlockLoss(block, len(inside), _psnr(errors[block]), 0.0))
    finally:
        float_model.train(was_training[0])
        qmodel.train(was_training[1])
    summed = sum(errors.values())
    for block in blocks:
        block.error_share = errors[block.name] / summed if summed > 0 else 0.0
    fidelity = _psnr(total)
    check = EndToEndCheck(fidelity_psnr=fidelity, threshold_db=threshold_db, warning=None, crops=len(crops),
                          crop_size=crops.shape[-1], blocks=blocks)
    if fidelity is not None and fidelity < threshold_db:
        worst = ', '.join(b.name for b in check.worst() if b.error_share > 0)
        remedy = '' if config.reconstruction.enabled else ', or turn block reconstruction on'
        check.warning = (f'fidelity {fidelity:.2f} dB is below {threshold_db:.0f} dB: the quantized network may have '
                         f'collapsed; keep the worst blocks ({worst}) at higher bits with layer_bits{remedy}')
    check.seconds = time.perf_counter() - start
    if log:
        if check.warning:
            logger.warning(f'{check.summary()}. WARNING: {check.warning}')
        else:
            logger.info(check.summary())
    return check
