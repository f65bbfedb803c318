"""tools/distillation_step_cost.py: it recovers the weights of a step's counted parts from step times, and
measures a real network's step (skipped without the shared checkpoints)."""
from __future__ import annotations

import json

import pytest

from tiny_sr import load_tool, single_thread  # noqa: F401  (autouse fixture)


def test_the_fit_recovers_the_weights_of_linear_step_times():
    tool = load_tool('distillation_step_cost')
    rows = [{'macs': m, 'quantized_values': v, 'layers': n, 'work': m + 100 * v + 1e6 * n,
             'seconds_per_step': 2e-9 * (m + 300 * v + 4e6 * n)}
            for m, v, n in [(1e9, 2e6, 20), (2e9, 1e6, 60), (5e8, 6e6, 40), (3e9, 3e6, 10)]]
    weights = tool.fit(rows)
    assert weights['element_work'] == pytest.approx(300, rel=1e-6)
    assert weights['layer_work'] == pytest.approx(4e6, rel=1e-6)
    assert all(r['fit_over_measured'] == pytest.approx(1.0, rel=1e-6) for r in rows)
    # Today's weights (100, 1e6 here) predict worse than the fit, and the table says by how much.
    assert max(abs(r['today_over_measured'] - 1.0) for r in rows) > 0.05


def test_a_real_network_is_measured_and_written(shared, tmp_path, monkeypatch):
    monkeypatch.setenv('OAQ_SHARED', str(shared))
    tool = load_tool('distillation_step_cost')
    assert tool.main(['--models', 'fsrcnn_x4', 'fsrcnn_x3', 'fsrcnn_x2', '--steps', '2',
                      '--out', str(tmp_path)]) == 0
    record = json.loads((tmp_path / 'distillation_step_cost.json').read_text())
    rows = record['models']
    assert [r['model'] for r in rows] == ['fsrcnn_x4', 'fsrcnn_x3', 'fsrcnn_x2']
    assert all(r['seconds_per_step'] > 0 and r['macs'] > 0 and r['quantized_values'] > 0 for r in rows)
    # FSRCNN's step is light: the budget gives it the cap.
    assert all(r['steps_given'] == 2000 for r in rows)
