"""The end-to-end check after quantization: fidelity on held-back calibration crops, the per-block error
profile, the warning under the threshold, and its place in the pipeline result and the report."""
from __future__ import annotations

import json
import logging

import torch

from oaq_plugin import OAQConfig
from oaq_plugin.pipeline.analysis.end_to_end_check import WARN_BELOW_DB, end_to_end_check, held_back_crops
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.pipeline.io.report import RunReport
from oaq_plugin.pipeline.run import run_pipeline
from tiny_sr import TinyResSR, single_thread, tiny_images  # noqa: F401

OPTIONS = {'w_bits': 8, 'a_bits': 8, 'search': {'enabled': False}, 'reconstruction': {'enabled': False},
           'distillation': {'enabled': False},
           'calib': {'patch_size': 12, 'batch_size': 4,
                                                                               'num_batches': 3}}


def pipeline_run():
    torch.manual_seed(0)
    model = TinyResSR().eval()
    source = PatchSource(tiny_images())
    config = OAQConfig.from_dict(OPTIONS)
    return model, source, config, run_pipeline(model, source, config)


def test_check_runs_with_the_pipeline_and_lands_in_the_report(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger='oaq_plugin'):
        model, source, config, result = pipeline_run()
    check = result.check
    assert check is not None and check.warning is None
    assert check.fidelity_psnr > WARN_BELOW_DB
    assert [block.name for block in check.blocks] == ['head', 'block1', 'block2', 'up']
    assert [block.layers for block in check.blocks] == [1, 2, 2, 1]
    assert abs(sum(block.error_share for block in check.blocks) - 1.0) < 1e-9
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('OAQ check:')]
    assert len(lines) == 1 and 'held-back calibration crops' in lines[0]
    RunReport(tmp_path / 'oaq_report.json', result).write()
    report = json.loads((tmp_path / 'oaq_report.json').read_text())
    assert report['check']['fidelity_psnr'] == check.fidelity_psnr
    assert len(report['check']['blocks']) == 4 and report['check']['threshold_db'] == WARN_BELOW_DB


def test_held_back_crops_are_not_calibration_crops():
    source = PatchSource(tiny_images())
    config = OAQConfig.from_dict(OPTIONS)
    crops = held_back_crops(source, config)
    calibration = torch.cat(source.batches(3, 4, 12, config.calib.seed))
    assert crops.shape == (4, 3, 12, 12)
    assert not any(torch.equal(crop, sample) for crop in crops for sample in calibration)
    assert torch.equal(crops, held_back_crops(source, config))


def test_a_collapsed_block_is_named_and_warned_about(caplog):
    model, source, config, result = pipeline_run()
    qmodel = result.model
    healthy = end_to_end_check(model, qmodel, source, config, log=False).fidelity_psnr
    # Block 2 collapses: its first conv's input grid is stretched over +-300 (8 levels per tail of it).
    qmodel.block2.conv1.act_quantizer.set_bounds(-300.0, 300.0)
    qmodel.block2.conv1.act_quantizer.set_breakpoint(250.0)
    # The tiny network's output is mostly its interpolated input, so its fidelity stays high: the
    # threshold is set between the healthy and the collapsed network's for the test.
    threshold = healthy - 3.0
    with caplog.at_level(logging.INFO, logger='oaq_plugin'):
        check = end_to_end_check(model, qmodel, source, config, threshold_db=threshold)
    assert check.fidelity_psnr < threshold and check.threshold_db == threshold
    assert check.worst()[0].name == 'block2' and check.worst()[0].error_share > 0.9
    assert check.warning is not None and 'block2' in check.warning
    assert 'turn block reconstruction on' in check.warning  # it did not run here
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and 'OAQ check:' in r.getMessage()]
    assert len(warnings) == 1
    # The quantized network's layer modes are as they were.
    assert all(layer.mode == 'quant' for layer in (qmodel.head, qmodel.block1.conv1, qmodel.up))
