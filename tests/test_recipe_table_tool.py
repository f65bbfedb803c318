"""tools/recipe_table.py: records gathered from several benchmark files, gaps from each network's FP32 row,
and rows of an older configuration marked with the options that changed."""
from __future__ import annotations

import json

import pytest

from oaq_plugin import OAQConfig
from tiny_sr import load_tool


@pytest.fixture(scope='module')
def tool():
    return load_tool('recipe_table')


def _record(model, rung, psnr, config=None, **extra):
    metrics = {'psnr': psnr, 'ssim': 0.9, 'delta_e': 3.0}
    if rung != 'fp':
        metrics['fidelity_psnr'] = 40.0
    record = {'model': model, 'rung': rung, 'label': rung, 'metrics': {'Set5': metrics},
              'timings': {'calibrate_s': 10.0, 'distillation_s': 100.0}, 'peak_rss_mb': 1000.0, 'wall_s': 600.0,
              **extra}
    if config is not None:
        record['config'] = config
    return record


def _payload(date, records, threads=1):
    return {'environment': {'date': f'{date}T10:00:00', 'threads': threads}, 'sets': ['Set5'], 'records': records}


def test_later_files_replace_records_and_old_configurations_are_named(tool, tmp_path):
    today = OAQConfig().to_dict()
    old = json.loads(json.dumps(today))
    old['distillation']['iterations'] = 1000
    del old['distillation']['work_budget']  # an option added after the record: not compared
    older = OAQConfig.from_dict({'w_bits': 8, 'a_bits': 8}).to_dict()
    del older['distillation']  # measured before the stage existed: it runs today
    first = tmp_path / 'first.json'
    first.write_text(json.dumps(_payload('2026-12-01', [
        _record('imdn_x4', 'fp', 32.0), _record('imdn_x4', 'default', 30.0, old),
        _record('pan_x4', 'default_w8a8', 31.0, older), _record('pan_x4', 'fp', 31.5)])))
    second = tmp_path / 'second.json'  # the gathered form: several payloads under 'runs'
    second.write_text(json.dumps({'note': 'n', 'runs': [
        _payload('2026-12-02', [_record('rfdn_x4', 'default', 29.5, today, distillation={'iterations': 1696})],
                 threads=2),
        _payload('2026-12-03', [_record('rfdn_x4', 'fp', 30.5),
                                {'model': 'rfdn_x4', 'rung': 'paper', 'error': 'x'}])]}))
    records = tool.load_records([first, second])
    assert records[('rfdn_x4', 'default')]['threads'] == 2 and ('rfdn_x4', 'paper') not in records
    lines = tool.table(records, ['default', 'default_w8a8'], ['Set5'])
    rows = [line for line in lines if line.startswith('| ') and not line.startswith('| model')]
    assert [row.split(' | ')[0] for row in rows] == ['| imdn_x4', '| rfdn_x4', '| pan_x4']
    assert '| 30.00 / 0.9000 | 2.00 |' in rows[0]
    assert '| 1696 | 29.50 / 0.9000 | 1.00 |' in rows[1] and '2026-12-02, 2 thread(s), second.json' in rows[1]
    assert '| 10 / 0 / 0 / 100 / 0 | 10.0 | 1000 |' in rows[1]
    notes = [line for line in lines if line.startswith('- ')]
    assert notes == ["- imdn_x4, default: not today's configuration: distillation.iterations: 1000 (now 0)",
                     "- pan_x4, default_w8a8: not today's configuration: distillation: not in the record (now enabled)"]


def test_a_stage_off_then_and_now_is_not_compared(tool):
    today = OAQConfig.from_dict({'preset': 'paper'}).to_dict()
    then = json.loads(json.dumps(today))
    assert not then['reconstruction']['enabled']
    then['reconstruction']['iterations'] += 1
    assert tool.stale_options(_record('imdn_x4', 'paper', 30.0, then)) == []
    then['finetune']['lr'] *= 2
    assert tool.stale_options(_record('imdn_x4', 'paper', 30.0, then)) == [
        f"finetune.lr: {then['finetune']['lr']} (now {today['finetune']['lr']})"]


def test_a_missing_file_is_a_clear_error(tool, tmp_path, capsys):
    assert tool.main([str(tmp_path / 'nothing.json')]) == 2
    assert 'no such file' in capsys.readouterr().err
