"""tools/bench_onnx_conv.py: every form it times is a valid convolution that ONNX Runtime runs, the integer
ones computing the same integer products, and the tool writes its table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_sr import load_tool

pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def tool():
    return load_tool('bench_onnx_conv')


def test_integer_forms_compute_the_products_of_their_codes(tool):
    from oaq_plugin.pipeline.io.onnx_export import onnx_session
    from onnx import numpy_helper
    import onnx
    for name, op, act, weight in tool.FORMS:
        if op != 'ConvInteger':
            continue
        model = tool.conv_model(op, act, weight, channels=4)
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(model).graph.initializer}
        x = tool.example(act, 4, 6, 5)
        out = onnx_session(model).run(None, {'x': x})[0]
        w = torch.from_numpy(inits['w'].astype(np.float64) - float(inits['wz']))
        expected = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64) - float(inits['xz'])), w, padding=1)
        assert np.array_equal(out, expected.numpy().astype(np.int32)), name


def test_the_tool_writes_every_form_for_every_thread_count(tool, tmp_path):
    assert tool.main(['--channels', '4', '--height', '8', '--width', '8', '--runs', '2', '--warmup', '1',
                      '--threads', '1', '2', '--out', str(tmp_path), '--name', 'forms']) == 0
    result = json.loads((tmp_path / 'forms.json').read_text())
    for threads in ('1', '2'):
        assert set(result['ms'][threads]) == {name for name, *_ in tool.FORMS}
        assert all(ms > 0 for ms in result['ms'][threads].values())
    table = (tmp_path / 'forms.md').read_text()
    assert all(name in table for name, *_ in tool.FORMS)
