"""The stage protocol and its runner: a stage added by one entry in STAGES is run, timed, reported and resumed;
reports serialise from their fields; the forward-hook, seeded-generator and fast fake-quant helpers."""
from __future__ import annotations

import json
import signal
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn

from oaq_plugin import Interrupted, run_pipeline
from oaq_plugin.pipeline import run as run_module
from oaq_plugin.pipeline.resume import StopRequest, load_state
from oaq_plugin.pipeline.stages.base import Stage, StageContext, StageReport
from oaq_plugin.pipeline.stages.block_reconstruction import BlockReconstruction, ReconstructionReport
from oaq_plugin.pipeline.stages.finetune import EpochRecord, FinetuneReport
from oaq_plugin.pipeline.stages.search import LayerSearch, SearchReport
from oaq_plugin.quant.activation import activation_quantizers, fast_fake_quantization
from oaq_plugin.quant.fast_fake_quant import fast_quantize
from oaq_plugin.quant.forward_hooks import forward_hooks
from oaq_plugin.quant.layers import quant_layers
from oaq_plugin.quant.seeding import seeded_generator
from tiny_sr import calibrated_tiny, tiny_pipeline_world, single_thread  # noqa: F401 (autouse fixture)

# Calibration only (3 batches, so 3 safe points), then the added stage.
OPTIONS = {'search': {'enabled': False}, 'reconstruction': {'enabled': False}, 'distillation': {'enabled': False}}


@dataclass
class CountReport(StageReport):
    layers: int = 0
    resumed_from: Optional[int] = None

    def summary(self) -> str:
        return f'{self.layers} layers'


class CountStage(Stage):
    """A stage as a newcomer would add it: counts the quantized layers, with one safe point."""

    name = 'count'
    report_type = CountReport

    def enabled(self, config) -> bool:
        return True

    def run(self, context: StageContext) -> CountReport:
        count = len(quant_layers(context.qmodel))
        context.safe_point(lambda: {'counted': count})
        return CountReport(layers=count, resumed_from=None if context.saved is None else context.saved['counted'])


class StopAt(StopRequest):
    def __init__(self, at):
        super().__init__()
        self.reads, self.at = 0, at

    def is_set(self):
        self.reads += 1
        if self.reads == self.at:
            self.set(signal.SIGTERM)
        return super().is_set()


@pytest.fixture
def with_count_stage(monkeypatch):
    monkeypatch.setattr(run_module, 'STAGES', run_module.STAGES + (CountStage(),))


def test_a_stage_added_to_stages_is_run_timed_and_reported(with_count_stage):
    model, batches, config = tiny_pipeline_world(OPTIONS)
    result = run_pipeline(model, batches, config)
    assert run_module.stage_names()[-1] == 'count'
    assert set(result.timings) == {f'{name}_s' for name in run_module.stage_names()}
    assert result.reports['count'] == CountReport(layers=len(quant_layers(result.model)))
    # Disabled stages make no report; the report dict still names every reporting stage.
    assert set(result.reports) == {'count'}
    dicts = result.report_dicts()
    assert dicts['count'] == {'layers': len(quant_layers(result.model)), 'resumed_from': None}
    assert dicts['search'] is None and 'calibrate' not in dicts


def test_an_added_stage_stops_and_resumes_through_the_runner(with_count_stage, tmp_path):
    model, batches, config = tiny_pipeline_world(OPTIONS)
    path = tmp_path / 'state.pth'
    with pytest.raises(Interrupted):
        run_pipeline(model, batches, config, state_path=path, stop=StopAt(4))
    state = load_state(path)
    layers = len(quant_layers(run_pipeline(model, batches, config).model))
    assert state['stage'] == 'count' and state['progress'] == {'counted': layers}
    resumed = run_pipeline(model, batches, config, state_path=path, resume=True)
    assert resumed.reports['count'] == CountReport(layers=layers, resumed_from=layers)
    assert not path.exists()


def test_reports_round_trip_through_plain_data():
    search = SearchReport(layers=[LayerSearch('a', 'Conv2d', 4, 4, {'lower': 0.0, 'breakpoint': None},
                                              {'lower': 0.5, 'breakpoint': 1.0}, 2.0, 1.0, 4.0)],
                          seconds=1.5, sequential=True, num_samples=3)
    data = json.loads(json.dumps(search.to_dict()))
    assert data['layers'][0]['error_reduction'] == 0.5 and data['relative_error_searched'] == 0.25
    assert SearchReport.from_dict(data) == search
    blocks = ReconstructionReport(blocks=[BlockReconstruction('', 2, 1, 1.0, 0.5, 2.0, True, 0.1)], seconds=2.0)
    assert ReconstructionReport.from_dict(json.loads(json.dumps(blocks.to_dict()))) == blocks
    finetune = FinetuneReport(mode='sensitivity', tap_kind='blocks', taps=['b1'], tap_weights=[1.0], tap_stds=[0.2],
                              epochs=[EpochRecord(0, 'weight_clip', 1e-3, 1.0, 0.9, 0.1, 0.5)], iterations=4)
    restored = FinetuneReport.from_dict(json.loads(json.dumps(finetune.to_dict())))
    assert restored == finetune and isinstance(restored.epochs[0], EpochRecord)


def test_forward_hooks_pass_names_replace_outputs_and_are_removed_on_error():
    modules = [('a', nn.Identity()), ('b', nn.Identity())]
    seen = []

    def double(name, module, args, output):
        seen.append(name)
        return output * 2
    with forward_hooks(modules, double):
        assert float(modules[0][1](torch.ones(1))) == 2.0
        modules[1][1](torch.ones(1))
    assert seen == ['a', 'b']

    def stop(name, module, args):
        raise RuntimeError('stop')
    with pytest.raises(RuntimeError):
        with forward_hooks(modules, stop, pre=True):
            modules[0][1](torch.ones(1))
    for _, module in modules:
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert float(modules[0][1](torch.ones(1))) == 1.0


def test_seeded_generators_are_stable_per_key():
    draw = (lambda generator: torch.rand(4, generator=generator))
    assert torch.equal(draw(seeded_generator(3, 'body.0')), draw(seeded_generator(3, 'body.0')))
    assert not torch.equal(draw(seeded_generator(3, 'body.0')), draw(seeded_generator(3, 'body.1')))
    # The streams of earlier releases, so that windows, crops and observer samples stay the same.
    expected = torch.Generator().manual_seed(3 * 1_000_003 + zlib.crc32(b'body.0'))
    assert torch.equal(draw(seeded_generator(3, 'body.0')), draw(expected))
    assert torch.equal(draw(seeded_generator(3, 7)), draw(torch.Generator().manual_seed(3 * 1_000_003 + 7)))
    assert torch.equal(draw(seeded_generator(5)), draw(torch.Generator().manual_seed(5)))


def test_fast_fake_quantization_is_a_switch_on_the_quantizers():
    _, qmodel, _, _, _ = calibrated_tiny()
    quantizers = [q for _, q in activation_quantizers(qmodel)]
    x = torch.randn(2, 8, 6, 6)
    with fast_fake_quantization(qmodel):
        assert all(q.fast and 'forward' not in vars(q) for q in quantizers)
        with fast_fake_quantization(qmodel):
            pass
        assert all(q.fast for q in quantizers), 'a nested switch leaves the outer one on'
        fast = quantizers[1](x)
    assert not any(q.fast for q in quantizers)
    grid = quantizers[1].grid()
    assert torch.equal(fast, fast_quantize(grid, x))
    assert torch.equal(quantizers[1](x), grid.quantize(x))
