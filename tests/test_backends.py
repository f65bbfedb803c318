"""Backends of quantized layers: reference == fake quantization, Triton == reference, selection and fallback."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from layer_cases import GRIDS, make_layer, quantized_tiny_sr, random_input, relative_error
from layer_cases import single_thread  # noqa: F401  (autouse fixture)
from oaq_plugin.backends.reference import reference_forward
from oaq_plugin.backends.select import backend_summary, resolve_backend, to_backend
from oaq_plugin.errors import ConfigError, UnsupportedLayerError

FAKE_TOLERANCE = 1e-4
TRITON_TOLERANCE = 1e-5

LAYER_KINDS = {
    'conv3x3': (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 5, 5)),
    'conv-stride2-grouped': (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), (2, 8, 6, 6)),
    'conv-reflect': (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'), (1, 4, 5, 5)),
    'conv-transpose': (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (1, 4, 4, 4)),
    'conv-transpose-grouped': (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2), (1, 4, 4, 4)),
    'linear': (lambda: nn.Linear(10, 7), (3, 5, 10)),
}


@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('kind', list(LAYER_KINDS))
@pytest.mark.parametrize('granularity', ['channel', 'tensor'])
def test_reference_equals_fake_quantization(kind, grid, granularity):
    build, shape = LAYER_KINDS[kind]
    layer = make_layer(build(), 4, 4, grid, seed=len(kind), granularity=granularity)
    x = random_input(shape)
    with torch.no_grad():
        fake = layer(x)
    assert relative_error(reference_forward(layer, x), fake) < FAKE_TOLERANCE
    assert relative_error(reference_forward(layer, x, torch.float64), fake) < FAKE_TOLERANCE


def test_reference_decodes_through_integer_codes():
    """The reference's quantized input is exactly the fake quantizer's output."""
    layer = make_layer(nn.Conv2d(4, 4, 1), 8, 4, 'pwlq')
    x = random_input((1, 4, 6, 6))
    grid = layer.act_quantizer.grid()
    codes = grid.encode(x)
    assert int(codes.min()) >= 0 and int(codes.max()) < grid.num_codes
    with torch.no_grad():
        assert torch.equal(grid.level_table()[codes], layer.act_quantizer(x))


@pytest.mark.parametrize('w_bits,a_bits,levels', [(4, 4, 'paper'), (8, 8, 'pwlq'), (4, 8, 'paper')])
def test_network_same_output_on_every_backend(w_bits, a_bits, levels):
    qmodel = quantized_tiny_sr(w_bits, a_bits, levels)
    x = torch.rand(1, 3, 6, 7, generator=torch.Generator().manual_seed(5))
    outputs = {}
    with torch.no_grad():
        for backend in ('fake', 'reference', 'triton'):
            to_backend(qmodel, backend)
            assert set(backend_summary(qmodel).values()) == {backend}
            outputs[backend] = qmodel(x)
    assert outputs['fake'].shape == (1, 3, 12, 14)
    assert relative_error(outputs['reference'], outputs['fake']) < FAKE_TOLERANCE
    assert relative_error(outputs['triton'], outputs['reference']) < TRITON_TOLERANCE


def test_fallback_logs_one_line_per_unsupported_layer(caplog):
    qmodel = quantized_tiny_sr(transposed_tail=True)
    with caplog.at_level(logging.INFO, logger='oaq_plugin'):
        to_backend(qmodel, 'triton')
    lines = [r.getMessage() for r in caplog.records if r.name == 'oaq_plugin']
    assert len(lines) == 1
    assert "'tail'" in lines[0] and 'ConvTranspose2d' in lines[0] and 'reference' in lines[0]
    summary = backend_summary(qmodel)
    assert summary['tail'] == 'reference'
    assert {v for k, v in summary.items() if k != 'tail'} == {'triton'}
    x = torch.rand(1, 3, 5, 5)
    with torch.no_grad():
        triton_out = qmodel(x)
        to_backend(qmodel, 'reference')
        assert relative_error(triton_out, qmodel(x)) < TRITON_TOLERANCE


def test_auto_is_reference_on_cpu_and_fake_restores_fake_quantization():
    qmodel = quantized_tiny_sr()
    assert resolve_backend(qmodel, 'auto') == 'reference'
    assert to_backend(qmodel, 'auto') is qmodel
    assert set(backend_summary(qmodel).values()) == {'reference'}
    to_backend(qmodel, 'fake')
    assert all(layer.executor is None for layer in qmodel.modules() if hasattr(layer, 'executor'))


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="did you mean 'triton'"):
        to_backend(quantized_tiny_sr(), 'trition')


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UnsupportedLayerError, match='reference'):
        to_backend(quantized_tiny_sr(), 'triton')


def test_triton_executor_follows_parameter_changes():
    layer = make_layer(nn.Conv2d(4, 4, 3, padding=1), 4, 4, 'paper')
    from oaq_plugin.backends.triton_backend import TritonExecutor
    layer.executor = TritonExecutor()
    x = random_input((1, 4, 4, 4))
    with torch.no_grad():
        before = layer(x)
        layer.act_quantizer.set_breakpoint(float(layer.act_quantizer.breakpoint) * 0.5)
        layer.weight_quantizer.set_clip(layer.weight_quantizer.clip * 0.7)
        after = layer(x)
    assert not torch.equal(before, after)
    assert relative_error(after, reference_forward(layer, x, torch.float64)) < TRITON_TOLERANCE
