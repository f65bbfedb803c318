"""tools/heldout_fidelity.py: any option variant (reconstruction levers included) on a base, measured on
held-out images, written to a JSON file with the seconds of every stage."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from oaq_plugin.pipeline.run import stage_names
from oaq_plugin.quant.layers import quant_layers
from tiny_sr import TinyResSR, calibrated_tiny, load_tool, tiny_images, single_thread  # noqa: F401  (autouse fixture)

TINY = {'calib': {'num_batches': 1, 'batch_size': 4, 'patch_size': 12},
        'search': {'grid_size': 4, 'refine_rounds': 0, 'num_samples': 2, 'window': 8}}
LEVERS = {'reconstruction': {'enabled': True, 'iterations': 5, 'num_samples': 4, 'patch_size': 12, 'max_layers': 2,
                             'group_siblings': True, 'weight_clips': True, 'window': 8},
          'distillation': {'enabled': True, 'iterations': 2, 'batch_size': 1, 'patch_size': 8, 'check_crops': 1}}


def test_variants_are_merged_into_the_base_section_by_section():
    tool = load_tool('heldout_fidelity')
    config = tool.merged(tool.BASES['w8a8'], {'w_bits': 4, 'search': {'breakpoint': False}})
    assert config == {'w_bits': 4, 'a_bits': 8, 'search': {'enabled': False, 'breakpoint': False},
                      'reconstruction': {'enabled': False}, 'distillation': {'enabled': False}}
    # The historical base measures calibration alone, whatever today's default stages are.
    assert not tool.OAQConfig.from_dict(tool.BASES['w8a8']).reconstruction.enabled
    assert tool.merged(tool.BASES['default'], {}) == {}


def tool_on_tiny_world(tmp_path, monkeypatch):
    """The tool, reading 62 tiny SunHays80 images under ``tmp_path`` and quantizing a tiny network for any model."""
    tool = load_tool('heldout_fidelity')
    folder = tmp_path / 'data/calib/SunHays80/LR_bicubic/X2'
    folder.mkdir(parents=True)
    for index, image in enumerate(tiny_images(count=62, size=16)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            folder / f'{index:03d}.png')
    torch.manual_seed(0)
    monkeypatch.setattr(tool, 'shared_root', lambda: tmp_path)
    monkeypatch.setattr(tool, 'build_zoo_model', lambda key, shared: TinyResSR().eval())
    return tool


def test_main_measures_each_variant_and_writes_stage_seconds(tmp_path, monkeypatch):
    tool = tool_on_tiny_world(tmp_path, monkeypatch)
    out = tmp_path / 'bench.json'
    assert tool.main(['--model', 'imdn_x2', '--base', 'default', '--json', str(out), '--per-layer',
                      repr({**TINY, 'w_bits': 4, 'a_bits': 4, 'reconstruction': {'enabled': False},
                            'distillation': {'enabled': False}}),
                      repr({**TINY, **LEVERS})]) == 0
    data = json.loads(out.read_text())
    assert data['base'] == 'default' and data['torch_threads'] == 1 and 'images 61-62' in data['held_out']
    plain, levers = data['variants']
    for record in (plain, levers):
        assert set(record['fidelity_psnr_y']) == {'all', 'weights_only', 'activations_only'}
        assert all(np.isfinite(v) for v in record['fidelity_psnr_y'].values())
        assert set(record['stage_seconds']) == {f'{name}_s' for name in stage_names()}
    assert plain['reconstruction'] is None and plain['config']['search']['enabled']
    assert levers['config']['reconstruction']['group_siblings'] and levers['stage_seconds']['reconstruction_s'] > 0
    assert levers['reconstruction']['blocks']
    # Distillation's report (its check-crop errors and whether it was kept) is in the record when it ran.
    assert plain['distillation'] is None and levers['distillation']['iterations'] == 2
    assert np.isfinite(levers['distillation']['error_before'])
    # Each layer's share: both parts of every quantized layer, largest gain first, and leaving a part
    # unquantized changes the output (the bypass is real and is undone afterwards).
    rows = plain['per_layer']
    layers = {row['layer'] for row in rows}
    assert len(rows) == 2 * len(layers) and {row['unquantized'] for row in rows} == {'activations', 'weights'}
    gains = [row['gain_db'] for row in rows]
    assert gains == sorted(gains, reverse=True) and any(abs(g) > 1e-6 for g in gains)


def test_each_variant_is_written_as_soon_as_it_is_measured(tmp_path, monkeypatch):
    tool = tool_on_tiny_world(tmp_path, monkeypatch)
    out = tmp_path / 'bench.json'
    real_quantized = tool._quantized

    def stop_at_second(model, calibration, config, shared_runs):
        if config.equalization.enabled:
            raise KeyboardInterrupt  # a long run stopped by hand during its second variant
        return real_quantized(model, calibration, config, shared_runs)

    monkeypatch.setattr(tool, '_quantized', stop_at_second)
    plain = {**TINY, 'reconstruction': {'enabled': False}, 'distillation': {'enabled': False}}
    try:
        tool.main(['--model', 'imdn_x2', '--base', 'default', '--json', str(out), '--no-split', repr(plain),
                   repr({**plain, 'equalization': {'enabled': True}})])
    except KeyboardInterrupt:
        pass
    data = json.loads(out.read_text())
    assert len(data['variants']) == 1 and data['variants'][0]['equalization'] == []
    monkeypatch.setattr(tool, '_quantized', real_quantized)
    assert tool.main(['--model', 'imdn_x2', '--base', 'default', '--json', str(out), '--no-split',
                      repr({**plain, 'equalization': {'enabled': True}})]) == 0
    pairs = json.loads(out.read_text())['variants'][0]['equalization']
    assert [pair['producer'] for pair in pairs] == ['block1.conv1', 'block2.conv1']


def test_per_layer_costs_leave_the_model_as_it_was():
    tool = load_tool('heldout_fidelity')
    _, qmodel, _, _, batches = calibrated_tiny({'w_bits': 4, 'a_bits': 4})
    x = batches[0][:2]
    with torch.no_grad():
        before = qmodel(x)
    seen = []

    def fidelity(net):
        with torch.no_grad():
            out = net(x)
        seen.append(not torch.equal(out, before))
        return -float((out - before).abs().sum())

    rows = tool.per_layer_costs(qmodel, fidelity, 0.0, log=lambda line: None)
    assert len(rows) == 2 * len(list(quant_layers(qmodel))) and all(seen)
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)


def test_distillation_variants_share_the_stages_before_it_and_equal_whole_runs(monkeypatch):
    tool = load_tool('heldout_fidelity')
    torch.manual_seed(0)
    model = TinyResSR().eval()
    source = tool.PatchSource(tiny_images(count=6, size=24))
    base = {**TINY, 'w_bits': 4, 'a_bits': 4, 'reconstruction': {**LEVERS['reconstruction'], 'group_siblings': False},
            'distillation': LEVERS['distillation']}
    variants = [tool.merged(base, {'distillation': {'iterations': n}}) for n in (1, 3)]
    calls = []
    real_run = tool.run_pipeline
    monkeypatch.setattr(tool, 'run_pipeline', lambda *args, **kwargs: calls.append(args[2]) or real_run(*args, **kwargs))
    shared: dict = {}
    x = source.batch(2, 12, torch.Generator().manual_seed(5))
    for variant in variants:
        config = tool.OAQConfig.from_dict(variant)
        qmodel, timings, reports = tool._quantized(model, source, config, shared)
        whole = real_run(model, source, config)
        with torch.no_grad():
            assert torch.equal(qmodel(x), whole.model(x)), 'a shared run differs from the whole pipeline'
        assert reports['distillation']['iterations'] == config.distillation.iterations
        errors = [[(b['error_before'], b['error_after']) for b in r['reconstruction']['blocks']]
                  for r in (reports, whole.report_dicts())]
        assert errors[0] == errors[1]
        assert set(timings) == {f'{name}_s' for name in stage_names()}
    # The stages before distillation ran once for both variants, with distillation off.
    assert len(calls) == 1 and not calls[0].distillation.enabled
