"""How many steps distillation takes when ``distillation.iterations`` is 0 (the default): as many as a fixed
budget of work allows, at most ``max_iterations``. A light network then trains longer in about the time a
heavy one needs for fewer steps, and the count depends on the network and the settings only, never on the
machine or its load, so a run is repeatable.

A step's work is counted on one forward of the quantized network on one training crop, in multiply-add
equivalents: the multiply-adds of its products, plus :data:`ELEMENT_WORK` for each value entering an
activation quantizer (the inputs of quantized layers and matmuls: fake quantization, its backward and the
elementwise work around it), times the crops
of a step; plus :data:`LAYER_WORK` for each quantized layer (the fixed cost of its ops at any crop size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...config import DistillationConfig
from ...quant.attention import QuantMatmul
from ...quant.forward_hooks import forward_hooks
from ...quant.layers import QuantLayer, quant_layers
from ...quant.op_accounting import count_operations

# Multiply-add equivalents of one value entering an activation quantizer, and of one quantized layer's
# fixed per-step cost. Fit by least squares to one-thread CPU times of a distillation step of the zoo's
# IMDN, RFDN, PAN, CARN-M and SRVGG x4 (batch 2 of 48-px crops): within 10 % of each, re-measured with
# tools/distillation_step_cost.py.
ELEMENT_WORK = 160.0
LAYER_WORK = 2.5e7
# The unit of ``DistillationConfig.work_budget``.
TERA = 1e12


@dataclass
class StepWork:
    """The counted work of one distillation step, and the steps the budget gives."""

    macs: int
    quantized_values: int
    layers: int
    batch_size: int

    @property
    def total(self) -> float:
        """Multiply-add equivalents of one step."""
        return self.batch_size * (self.macs + ELEMENT_WORK * self.quantized_values) + LAYER_WORK * self.layers

    def iterations(self, settings: DistillationConfig) -> int:
        """The steps ``settings.work_budget`` pays for, between 1 and ``settings.max_iterations``."""
        affordable = math.floor(settings.work_budget * TERA / self.total) if self.total > 0 else settings.max_iterations
        return max(1, min(settings.max_iterations, affordable))


@torch.no_grad()
def step_work(qmodel: nn.Module, crop: torch.Tensor, batch_size: int) -> StepWork:
    """Count the work of a step of ``batch_size`` crops shaped like ``crop`` (one crop, ``(1, C, H, W)``), on
    the one forward that counts the multiply-adds."""
    counted = [0]

    def count(_name: str, _module: nn.Module, inputs: tuple) -> None:
        counted[0] += sum(x.numel() for x in inputs if isinstance(x, torch.Tensor))

    quantized = [(name, m) for name, m in qmodel.named_modules() if isinstance(m, (QuantLayer, QuantMatmul))]
    with forward_hooks(quantized, count, pre=True):
        macs = count_operations(qmodel, crop).total_macs
    return StepWork(macs=macs, quantized_values=counted[0], layers=len(quant_layers(qmodel)), batch_size=batch_size)


def planned_iterations(qmodel: nn.Module, crop: torch.Tensor, settings: DistillationConfig) -> int:
    """``settings.iterations`` when set, else the steps the work budget gives ``qmodel`` (see the module)."""
    if settings.iterations:
        return settings.iterations
    return step_work(qmodel, crop, settings.batch_size).iterations(settings)
