"""The distillation length chosen by the work budget: counted from the quantized network, inversely
proportional to a step's work, capped, overridden by an explicit ``iterations``, and what the stage runs."""
from __future__ import annotations

import torch
from torch import nn

from oaq_plugin import run_pipeline
from oaq_plugin.config import DistillationConfig, OAQConfig
from oaq_plugin.pipeline.stages.distillation_length import (ELEMENT_WORK, LAYER_WORK, TERA, planned_iterations,
                                                            step_work)
from tiny_sr import TinyResSR, calibrated_tiny, tiny_images, tiny_pipeline_world, single_thread  # noqa: F401


def test_step_work_counts_the_products_the_quantized_values_and_the_layers():
    _, qmodel, _, _, _ = calibrated_tiny()
    crop = torch.rand(1, 3, 10, 10)
    work = step_work(qmodel, crop, batch_size=3)
    # TinyResSR on 10x10: head 3->8, four 8->8 convs, up 8->12, all 3x3, every pixel.
    assert work.macs == 100 * 9 * (8 * 3 + 4 * 8 * 8 + 12 * 8)
    assert work.quantized_values == 100 * (3 + 5 * 8)
    assert work.layers == 6
    assert work.total == 3 * (work.macs + ELEMENT_WORK * work.quantized_values) + LAYER_WORK * 6
    # The count leaves the model as it was.
    assert not qmodel.training and all(layer.mode == 'quant' for layer in qmodel.modules() if hasattr(layer, 'mode'))


def test_the_budget_buys_fewer_steps_for_more_work_up_to_the_cap():
    _, qmodel, _, _, _ = calibrated_tiny()
    small, large = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 64, 64)
    budget = step_work(qmodel, large, 2).total * 100 / TERA  # 100 steps of the large crops
    settings = DistillationConfig(work_budget=budget, max_iterations=10_000)
    assert planned_iterations(qmodel, large, settings) == 100
    steps_small = planned_iterations(qmodel, small, settings)
    assert 100 < steps_small == int(budget * TERA // step_work(qmodel, small, 2).total)
    assert planned_iterations(qmodel, small, DistillationConfig(work_budget=budget, max_iterations=150)) == 150
    assert planned_iterations(qmodel, large, DistillationConfig(work_budget=0.0)) == 1
    assert planned_iterations(qmodel, large, DistillationConfig(iterations=7, work_budget=budget)) == 7


def test_the_default_lets_the_budget_choose_and_the_stage_runs_that_many():
    assert OAQConfig().distillation.iterations == 0
    settings = {'patch_size': 16, 'batch_size': 2, 'check_crops': 2, 'max_iterations': 10_000}
    model, batches, config = tiny_pipeline_world({'search': {'enabled': False},
                                                  'reconstruction': {'enabled': False},
                                                  'distillation': {**settings, 'work_budget': 1e-12}})
    planned = run_pipeline(model, batches, config, progress=False).reports['distillation']
    # A budget of one multiply-add equivalent buys the minimum of one step.
    assert planned.planned == planned.iterations == 1
    _, qmodel, _, _, _ = calibrated_tiny()
    one_step = step_work(qmodel, torch.rand(1, 3, 16, 16), 2).total / TERA
    config = OAQConfig.from_dict({'search': {'enabled': False}, 'reconstruction': {'enabled': False},
                                  'distillation': {**settings, 'work_budget': 12.5 * one_step}})
    report = run_pipeline(model, batches, config, progress=False).reports['distillation']
    assert report.planned == report.iterations == 12
